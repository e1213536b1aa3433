// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

// Test wallets for payers with code: an ERC-1271 contract wallet owned by
// one EOA, a CREATE2 factory
// that deploys it counterfactually (ERC-6492), and an EIP-7702
// delegate that lets an EOA approve signatures by its own key. For
// local and test chains only.
//
// `isValidSignature` answers the ERC-1271 magic value 0x1626ba7e when the
// signature is a 65-byte low-s ECDSA signature of the hash by the account's
// key, and 0xffffffff otherwise; it never reverts on a bad signature.

// The ERC-1271 magic value.
bytes4 constant ERC1271_MAGIC = 0x1626ba7e;

// secp256k1n / 2.
uint256 constant HALF_CURVE_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

// The signer of a 65-byte `r || s || v` ECDSA signature of `hash`, or zero
// when it is malformed, malleable or recovers nobody.
function recoverSigner(bytes32 hash, bytes calldata signature) pure returns (address) {
    if (signature.length != 65) return address(0);
    bytes32 r = bytes32(signature[0:32]);
    bytes32 s = bytes32(signature[32:64]);
    uint8 v = uint8(signature[64]);
    if (uint256(s) > HALF_CURVE_ORDER || (v != 27 && v != 28)) return address(0);
    return ecrecover(hash, v, r, s);
}

/// A contract wallet whose owner approves signatures (ERC-1271) and moves
/// what it holds.
contract X402TestWallet {
    address public immutable owner;

    constructor(address owner_) {
        owner = owner_;
    }

    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        address signer = recoverSigner(hash, signature);
        return signer != address(0) && signer == owner ? ERC1271_MAGIC : bytes4(0xffffffff);
    }

    /// Calls `target` with `data` on the owner's behalf.
    function execute(address target, bytes calldata data) external returns (bytes memory) {
        require(msg.sender == owner, "X402TestWallet: caller is not the owner");
        (bool ok, bytes memory ret) = target.call(data);
        require(ok, "X402TestWallet: call failed");
        return ret;
    }
}

/// Deploys [`X402TestWallet`]s at addresses known before they exist.
contract X402TestWalletFactory {
    event WalletCreated(address indexed wallet, address indexed owner, bytes32 salt);

    /// Deploys `owner`'s wallet for `salt`, or returns it if it exists
    /// already (a second call is harmless, as with Coinbase's factory).
    function createWallet(address owner, bytes32 salt) external returns (address wallet) {
        wallet = walletAddress(owner, salt);
        if (wallet.code.length == 0) {
            new X402TestWallet{salt: _salt(owner, salt)}(owner);
            emit WalletCreated(wallet, owner, salt);
        }
    }

    /// The address `createWallet(owner, salt)` deploys to.
    function walletAddress(address owner, bytes32 salt) public view returns (address) {
        bytes32 code = keccak256(abi.encodePacked(type(X402TestWallet).creationCode, abi.encode(owner)));
        bytes32 hash = keccak256(abi.encodePacked(bytes1(0xff), address(this), _salt(owner, salt), code));
        return address(uint160(uint256(hash)));
    }

    function _salt(address owner, bytes32 salt) private pure returns (bytes32) {
        return keccak256(abi.encode(owner, salt));
    }
}

/// Code an EOA delegates to (EIP-7702): the account approves signatures by
/// its own key.
contract X402TestDelegate {
    function isValidSignature(bytes32 hash, bytes calldata signature) external view returns (bytes4) {
        address signer = recoverSigner(hash, signature);
        return signer != address(0) && signer == address(this) ? ERC1271_MAGIC : bytes4(0xffffffff);
    }
}

/// A hostile wallet: its `isValidSignature` burns all the gas it is given
/// and runs out (tests of a payer that starves the other checks of a batch).
contract X402TestGasBurner {
    function isValidSignature(bytes32, bytes calldata) external pure returns (bytes4) {
        uint256 n;
        while (true) {
            n = uint256(keccak256(abi.encode(n)));
        }
        return ERC1271_MAGIC;
    }
}

/// A hostile delegate that approves everything in a simulation (gas price
/// 0) and burns all its gas when the gas is paid for (tests of an EOA
/// that delegates to it after paying, to starve the rows of its batch).
contract X402TestPricedBurner {
    function isValidSignature(bytes32, bytes calldata) external view returns (bytes4) {
        uint256 n;
        while (tx.gasprice > 0) {
            n = uint256(keccak256(abi.encode(n)));
        }
        return ERC1271_MAGIC;
    }
}
