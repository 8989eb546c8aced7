// Compiles the test contracts with the pinned solc-js (node_modules/solc) and writes
// artifacts/<Contract>.json.  `node contracts-fixtures/build.mjs --check` recompiles and
// exits 1 if the committed artifacts differ from what the sources compile to.
//
// The output is deterministic: fixed source unit names (no absolute paths), fixed settings,
// metadata hash included (it only depends on the source text and the settings).
import { createHash } from 'node:crypto'
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const require = createRequire(import.meta.url)
const solc = require('solc')

// Contract name -> source file (one contract per file, no imports).
const CONTRACTS = { TestUSDC: 'TestUSDC.sol', TestWallet: 'TestWallet.sol' }

// Contracts whose runtime code is copied to another address with anvil_setCode: they must
// not rely on immutables (the deployed code would carry values baked in for the old address).
const RELOCATABLE = new Set(['TestUSDC'])

const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  // Cancun: supported by Base and by Anvil's default hardfork; pinned so a newer solc default
  // cannot emit opcodes the chain lacks.
  evmVersion: 'cancun',
  metadata: { bytecodeHash: 'ipfs' },
  outputSelection: {
    '*': {
      '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object', 'evm.deployedBytecode.immutableReferences'],
    },
  },
}

function sha256(text) {
  return createHash('sha256').update(text, 'utf8').digest('hex')
}

function compile() {
  const sources = {}
  for (const file of Object.values(CONTRACTS)) {
    sources[file] = { content: readFileSync(join(here, file), 'utf8') }
  }
  const input = { language: 'Solidity', sources, settings: SETTINGS }
  const output = JSON.parse(solc.compile(JSON.stringify(input)))
  const diagnostics = output.errors ?? []
  for (const d of diagnostics) {
    process.stderr.write(d.formattedMessage ?? `${d.severity}: ${d.message}\n`)
  }
  if (diagnostics.some((d) => d.severity === 'error')) {
    throw new Error('compilation failed')
  }

  const artifacts = {}
  for (const [name, file] of Object.entries(CONTRACTS)) {
    const contract = output.contracts?.[file]?.[name]
    if (!contract) throw new Error(`no output for ${file}:${name}`)
    const immutables = contract.evm.deployedBytecode.immutableReferences ?? {}
    if (RELOCATABLE.has(name) && Object.keys(immutables).length > 0) {
      throw new Error(`${name} uses immutables; its runtime code cannot be relocated with anvil_setCode`)
    }
    const { outputSelection, ...recordedSettings } = SETTINGS
    const artifact = {
      contractName: name,
      sourceName: file,
      abi: contract.abi,
      bytecode: '0x' + contract.evm.bytecode.object,
      deployedBytecode: '0x' + contract.evm.deployedBytecode.object,
      compiler: { name: 'solc-js', version: solc.version() },
      settings: recordedSettings,
      sourceSha256: sha256(sources[file].content),
    }
    artifacts[name] = JSON.stringify(artifact, null, 2) + '\n'
  }
  return artifacts
}

function main() {
  const check = process.argv.includes('--check')
  const outDir = join(here, 'artifacts')
  const artifacts = compile()
  let stale = []
  for (const [name, text] of Object.entries(artifacts)) {
    const path = join(outDir, `${name}.json`)
    if (check) {
      let committed = null
      try {
        committed = readFileSync(path, 'utf8')
      } catch {
        committed = null
      }
      if (committed !== text) stale.push(name)
    } else {
      mkdirSync(outDir, { recursive: true })
      writeFileSync(path, text)
      process.stdout.write(`wrote ${path}\n`)
    }
  }
  if (check) {
    if (stale.length > 0) {
      process.stderr.write(
        `stale artifacts (compiled with solc ${solc.version()}): ${stale.join(', ')}; ` +
          'run `node contracts-fixtures/build.mjs` and commit the result\n',
      )
      process.exit(1)
    }
    process.stdout.write(`artifacts match sources (solc ${solc.version()})\n`)
  }
}

main()
