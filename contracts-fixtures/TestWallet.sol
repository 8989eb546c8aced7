// SPDX-License-Identifier: MIT
pragma solidity ^0.8.20;

/// @title TestWallet
/// @notice A TEST-ONLY EIP-1271 smart wallet: one owner EOA, no execution logic.
/// @dev Lets tests pay from a contract account. A signature is valid when it is the owner's
/// 65-byte r || s || v signature over the very hash the token asks about (for EIP-3009 that is
/// the EIP-712 digest with `from` = this wallet, i.e. what `eth_signTypedData` produces).
contract TestWallet {
    bytes4 private constant ERC1271_MAGIC_VALUE = 0x1626ba7e;
    bytes4 private constant ERC1271_INVALID = 0xffffffff;
    uint256 private constant MAX_S = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    address public immutable owner;

    constructor(address owner_) {
        require(owner_ != address(0), "TestWallet: zero owner");
        owner = owner_;
    }

    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        if (signature.length != 65) {
            return ERC1271_INVALID;
        }
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > MAX_S || (v != 27 && v != 28)) {
            return ERC1271_INVALID;
        }
        address signer = ecrecover(hash, v, r, s);
        return signer != address(0) && signer == owner ? ERC1271_MAGIC_VALUE : ERC1271_INVALID;
    }
}
