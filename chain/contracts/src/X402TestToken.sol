// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

/// @title X402TestToken
/// @notice USDC-like ERC-20 (6 decimals) for local/test chains, implementing
///         EIP-2612 (permit) and EIP-3009 (transfer/receive/cancel with
///         authorization) with the same observable behaviour as Circle's
///         FiatToken v2.2: a signer without code is checked by `ecrecover`,
///         a signer with code (a contract wallet, an EIP-7702 delegated EOA)
///         by its ERC-1271 `isValidSignature` (FiatToken's
///         `SignatureChecker`), and the `(v, r, s)` functions pass
///         `abi.encodePacked(r, s, v)` to the same check as the `bytes
///         signature` ones. Not for production use.
///
/// Constructor: constructor(string name, string version) -- symbol is "USDC",
/// decimals is 6, the deployer becomes the owner (the only account allowed to
/// mint).
///
/// Revert strings (exact; the x402d engine classifies failures by these):
///   "FiatTokenV2: invalid signature"                  bad length / v not 27|28 / s > n/2 /
///                                                     recovered zero address / signer mismatch /
///                                                     a signer with code that does not answer
///                                                     the ERC-1271 magic value
///                                                     (EIP-3009 and EIP-2612 alike)
///   "FiatTokenV2: authorization is not yet valid"     block.timestamp <= validAfter
///   "FiatTokenV2: authorization is expired"           block.timestamp >= validBefore
///   "FiatTokenV2: authorization is used or canceled"  nonce already used or cancelled
///   "FiatTokenV2: caller must be the payee"           receiveWithAuthorization with msg.sender != to
///   "FiatTokenV2: permit is expired"                  permit with block.timestamp > deadline
///   "ERC20: transfer amount exceeds balance"
///   "ERC20: transfer amount exceeds allowance"
///   "ERC20: transfer from the zero address"
///   "ERC20: transfer to the zero address"
///   "ERC20: approve from the zero address"
///   "ERC20: approve to the zero address"
///   "ERC20: mint to the zero address"
///   "X402TestToken: caller is not the owner"
///
/// Check order for transfer/receiveWithAuthorization (as in FiatToken v2):
///   (receive only: caller is payee) -> not yet valid -> expired -> used or
///   canceled -> signature -> mark used (emit AuthorizationUsed) -> transfer.
contract X402TestToken {
    // ---------------------------------------------------------------------
    // Constants
    // ---------------------------------------------------------------------

    /// keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
    bytes32 private constant EIP712_DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");

    bytes32 public constant TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );

    bytes32 public constant RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak256(
        "ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,uint256 validBefore,bytes32 nonce)"
    );

    bytes32 public constant CANCEL_AUTHORIZATION_TYPEHASH =
        keccak256("CancelAuthorization(address authorizer,bytes32 nonce)");

    bytes32 public constant PERMIT_TYPEHASH =
        keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");

    /// secp256k1n / 2; signatures with a larger s are malleable and rejected.
    uint256 private constant HALF_CURVE_ORDER =
        0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    string private constant ERR_INVALID_SIGNATURE = "FiatTokenV2: invalid signature";

    // ---------------------------------------------------------------------
    // Storage
    // ---------------------------------------------------------------------

    string private _name;
    string private _version;
    string public constant symbol = "USDC";
    uint8 public constant decimals = 6;

    address public immutable owner;

    bytes32 private immutable _hashedName;
    bytes32 private immutable _hashedVersion;
    uint256 private immutable _cachedChainId;
    bytes32 private immutable _cachedDomainSeparator;

    uint256 public totalSupply;
    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;

    /// EIP-2612 nonces.
    mapping(address => uint256) public nonces;

    /// EIP-3009 authorization states: true once used or cancelled.
    mapping(address => mapping(bytes32 => bool)) private _authorizationStates;

    // ---------------------------------------------------------------------
    // Events
    // ---------------------------------------------------------------------

    event Transfer(address indexed from, address indexed to, uint256 value);
    event Approval(address indexed owner, address indexed spender, uint256 value);
    event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
    event AuthorizationCanceled(address indexed authorizer, bytes32 indexed nonce);

    // ---------------------------------------------------------------------
    // Construction / admin
    // ---------------------------------------------------------------------

    constructor(string memory name_, string memory version_) {
        _name = name_;
        _version = version_;
        owner = msg.sender;
        _hashedName = keccak256(bytes(name_));
        _hashedVersion = keccak256(bytes(version_));
        _cachedChainId = block.chainid;
        _cachedDomainSeparator = _buildDomainSeparator(keccak256(bytes(name_)), keccak256(bytes(version_)));
    }

    function name() external view returns (string memory) {
        return _name;
    }

    /// EIP-712 domain version string (FiatToken exposes this as version()).
    function version() external view returns (string memory) {
        return _version;
    }

    function mint(address to, uint256 amount) external returns (bool) {
        require(msg.sender == owner, "X402TestToken: caller is not the owner");
        require(to != address(0), "ERC20: mint to the zero address");
        totalSupply += amount;
        unchecked {
            // Cannot overflow: balanceOf[to] <= totalSupply.
            balanceOf[to] += amount;
        }
        emit Transfer(address(0), to, amount);
        return true;
    }

    // ---------------------------------------------------------------------
    // ERC-20
    // ---------------------------------------------------------------------

    function transfer(address to, uint256 value) external returns (bool) {
        _transfer(msg.sender, to, value);
        return true;
    }

    function approve(address spender, uint256 value) external returns (bool) {
        _approve(msg.sender, spender, value);
        return true;
    }

    function transferFrom(address from, address to, uint256 value) external returns (bool) {
        uint256 current = allowance[from][msg.sender];
        require(value <= current, "ERC20: transfer amount exceeds allowance");
        unchecked {
            allowance[from][msg.sender] = current - value;
        }
        _transfer(from, to, value);
        return true;
    }

    function _transfer(address from, address to, uint256 value) internal {
        require(from != address(0), "ERC20: transfer from the zero address");
        require(to != address(0), "ERC20: transfer to the zero address");
        uint256 fromBalance = balanceOf[from];
        require(value <= fromBalance, "ERC20: transfer amount exceeds balance");
        unchecked {
            balanceOf[from] = fromBalance - value;
            // Cannot overflow: sum of balances == totalSupply.
            balanceOf[to] += value;
        }
        emit Transfer(from, to, value);
    }

    function _approve(address holder, address spender, uint256 value) internal {
        require(holder != address(0), "ERC20: approve from the zero address");
        require(spender != address(0), "ERC20: approve to the zero address");
        allowance[holder][spender] = value;
        emit Approval(holder, spender, value);
    }

    // ---------------------------------------------------------------------
    // EIP-712
    // ---------------------------------------------------------------------

    // solhint-disable-next-line func-name-mixedcase
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        if (block.chainid == _cachedChainId) {
            return _cachedDomainSeparator;
        }
        return _buildDomainSeparator(_hashedName, _hashedVersion);
    }

    /// ERC-5267 domain description.
    function eip712Domain()
        external
        view
        returns (
            bytes1 fields,
            string memory name_,
            string memory version_,
            uint256 chainId,
            address verifyingContract,
            bytes32 salt,
            uint256[] memory extensions
        )
    {
        return (hex"0f", _name, _version, block.chainid, address(this), bytes32(0), new uint256[](0));
    }

    function _buildDomainSeparator(bytes32 hashedName, bytes32 hashedVersion) private view returns (bytes32) {
        return keccak256(abi.encode(EIP712_DOMAIN_TYPEHASH, hashedName, hashedVersion, block.chainid, address(this)));
    }

    function _hashTypedData(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), structHash));
    }

    // ---------------------------------------------------------------------
    // Signature checks (FiatToken v2.2 SignatureChecker)
    // ---------------------------------------------------------------------

    bytes4 private constant ERC1271_MAGIC = 0x1626ba7e;

    /// `signer` signed `digest`: by ECDSA when it holds no code, else by its
    /// ERC-1271 approval.
    function _requireValidSignature(address signer, bytes32 digest, bytes memory signature) private view {
        if (signer.code.length != 0) {
            (bool ok, bytes memory ret) =
                signer.staticcall(abi.encodeWithSelector(ERC1271_MAGIC, digest, signature));
            require(ok && ret.length >= 32 && abi.decode(ret, (bytes4)) == ERC1271_MAGIC, ERR_INVALID_SIGNATURE);
            return;
        }
        require(signature.length == 65, ERR_INVALID_SIGNATURE);
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly ("memory-safe") {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
        require(uint256(s) <= HALF_CURVE_ORDER, ERR_INVALID_SIGNATURE);
        require(v == 27 || v == 28, ERR_INVALID_SIGNATURE);
        address recovered = ecrecover(digest, v, r, s);
        require(recovered != address(0) && recovered == signer, ERR_INVALID_SIGNATURE);
    }

    // ---------------------------------------------------------------------
    // EIP-2612
    // ---------------------------------------------------------------------

    function permit(address holder, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
    {
        require(deadline >= block.timestamp, "FiatTokenV2: permit is expired");
        bytes32 digest =
            _hashTypedData(keccak256(abi.encode(PERMIT_TYPEHASH, holder, spender, value, nonces[holder]++, deadline)));
        _requireValidSignature(holder, digest, abi.encodePacked(r, s, v));
        _approve(holder, spender, value);
    }

    // ---------------------------------------------------------------------
    // EIP-3009
    // ---------------------------------------------------------------------

    function authorizationState(address authorizer, bytes32 nonce) external view returns (bool) {
        return _authorizationStates[authorizer][nonce];
    }

    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external {
        _transferWithAuthorization(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v)
        );
    }

    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external {
        _transferWithAuthorization(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, signature
        );
    }

    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external {
        require(to == msg.sender, "FiatTokenV2: caller must be the payee");
        _transferWithAuthorization(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, abi.encodePacked(r, s, v)
        );
    }

    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) external {
        require(to == msg.sender, "FiatTokenV2: caller must be the payee");
        _transferWithAuthorization(
            RECEIVE_WITH_AUTHORIZATION_TYPEHASH, from, to, value, validAfter, validBefore, nonce, signature
        );
    }

    function cancelAuthorization(address authorizer, bytes32 nonce, uint8 v, bytes32 r, bytes32 s) external {
        _cancelAuthorization(authorizer, nonce, abi.encodePacked(r, s, v));
    }

    function cancelAuthorization(address authorizer, bytes32 nonce, bytes memory signature) external {
        _cancelAuthorization(authorizer, nonce, signature);
    }

    function _requireValidAuthorization(address authorizer, bytes32 nonce, uint256 validAfter, uint256 validBefore)
        private
        view
    {
        require(block.timestamp > validAfter, "FiatTokenV2: authorization is not yet valid");
        require(block.timestamp < validBefore, "FiatTokenV2: authorization is expired");
        _requireUnusedAuthorization(authorizer, nonce);
    }

    function _requireUnusedAuthorization(address authorizer, bytes32 nonce) private view {
        require(!_authorizationStates[authorizer][nonce], "FiatTokenV2: authorization is used or canceled");
    }

    function _transferWithAuthorization(
        bytes32 typehash,
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes memory signature
    ) private {
        _requireValidAuthorization(from, nonce, validAfter, validBefore);
        bytes32 digest =
            _hashTypedData(keccak256(abi.encode(typehash, from, to, value, validAfter, validBefore, nonce)));
        _requireValidSignature(from, digest, signature);

        // Mark used before moving funds.
        _authorizationStates[from][nonce] = true;
        emit AuthorizationUsed(from, nonce);

        _transfer(from, to, value);
    }

    function _cancelAuthorization(address authorizer, bytes32 nonce, bytes memory signature) private {
        _requireUnusedAuthorization(authorizer, nonce);
        bytes32 digest = _hashTypedData(keccak256(abi.encode(CANCEL_AUTHORIZATION_TYPEHASH, authorizer, nonce)));
        _requireValidSignature(authorizer, digest, signature);

        _authorizationStates[authorizer][nonce] = true;
        emit AuthorizationCanceled(authorizer, nonce);
    }
}
