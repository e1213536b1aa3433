// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

/// @title X402BatchSettlement
/// @notice Unidirectional payment channels with cumulative vouchers: the x402
///         `batch-settlement` EVM scheme. Written for x402d's local and test
///         chains with the interface of the public contract: the same EIP-712
///         domain ("x402 Batch Settlement", "1"), type strings, structs,
///         functions and events, so that vouchers, refunds and claim batches
///         signed for the public contract verify here.
///
/// Accounting, per channel (`channels[id]`):
///   balance       tokens deposited and not yet withdrawn or refunded; a
///                 voucher's `maxClaimableAmount` is bounded by it
///   totalClaimed  cumulative amount the receiver has claimed; never
///                 decreases, so an old voucher cannot be claimed twice
///   the unclaimed remainder `balance - totalClaimed` is what a withdrawal or
///   a refund can return to the payer.
/// Claims only move value into `receivers[receiver][token].totalClaimed`;
/// `settle` pays everything claimed but unsettled in one transfer.
///
/// The runtime code has no immutables and derives its domain separator from
/// `block.chainid` and `address(this)`, so it may be placed at any address
/// (`anvil_setCode`).
contract X402BatchSettlement {
    // ---------------------------------------------------------------------
    // Types
    // ---------------------------------------------------------------------

    struct ChannelConfig {
        address payer;
        address payerAuthorizer;
        address receiver;
        address receiverAuthorizer;
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    struct ChannelState {
        uint128 balance;
        uint128 totalClaimed;
    }

    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    /// `totalClaimed` is the cumulative total the claim brings the channel
    /// to, not a delta.
    struct VoucherClaim {
        Voucher voucher;
        bytes signature;
        uint128 totalClaimed;
    }

    struct WithdrawalState {
        uint128 amount;
        uint40 initiatedAt;
    }

    struct ReceiverState {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    // ---------------------------------------------------------------------
    // Constants
    // ---------------------------------------------------------------------

    uint40 public constant MIN_WITHDRAW_DELAY = 15 minutes;
    uint40 public constant MAX_WITHDRAW_DELAY = 30 days;

    bytes32 public constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 public constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");
    bytes32 public constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );
    bytes32 public constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");

    bytes32 private constant EIP712_DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant NAME_HASH = keccak256("x402 Batch Settlement");
    bytes32 private constant VERSION_HASH = keccak256("1");
    uint256 private constant HALF_CURVE_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;
    bytes4 private constant ERC1271_MAGIC = 0x1626ba7e;

    // ---------------------------------------------------------------------
    // State
    // ---------------------------------------------------------------------

    mapping(bytes32 channelId => ChannelState) public channels;
    mapping(bytes32 channelId => WithdrawalState) public pendingWithdrawals;
    mapping(bytes32 channelId => uint256) public refundNonce;
    mapping(address receiver => mapping(address token => ReceiverState)) public receivers;

    bool private transient _entered;

    // ---------------------------------------------------------------------
    // Events
    // ---------------------------------------------------------------------

    event ChannelCreated(bytes32 indexed channelId, ChannelConfig config);
    event ChannelClosed(bytes32 indexed channelId, ChannelConfig config);
    event Deposited(bytes32 indexed channelId, address indexed sender, uint128 amount, uint128 newBalance);
    event Claimed(bytes32 indexed channelId, address indexed sender, uint128 claimAmount, uint128 newTotalClaimed);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event Refunded(bytes32 indexed channelId, address indexed sender, uint128 amount);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint40 finalizeAfter);
    event WithdrawFinalized(bytes32 indexed channelId, address indexed sender, uint128 amount);

    // ---------------------------------------------------------------------
    // Errors
    // ---------------------------------------------------------------------

    error InvalidChannelConfig();
    error InvalidWithdrawDelay();
    error ZeroAmount();
    error DepositNotReceived(uint256 expected, uint256 received);
    error EmptyClaims();
    error NotReceiver(bytes32 channelId);
    error NotPayer(bytes32 channelId);
    error InvalidVoucherSignature(bytes32 channelId);
    error ClaimAboveVoucher(bytes32 channelId, uint128 totalClaimed, uint128 maxClaimableAmount);
    error ClaimAboveBalance(bytes32 channelId, uint128 totalClaimed, uint128 balance);
    error ReceiverAuthorizerMismatch(bytes32 channelId);
    error InvalidAuthorizerSignature();
    error WithdrawalAlreadyPending(bytes32 channelId);
    error NoPendingWithdrawal(bytes32 channelId);
    error WithdrawDelayNotElapsed(bytes32 channelId, uint40 finalizeAfter);
    error InvalidRefundNonce(bytes32 channelId, uint256 expected, uint256 given);
    error InvalidRefundSignature(bytes32 channelId);
    error TokenTransferFailed();
    error Reentrancy();

    modifier nonReentrant() {
        if (_entered) revert Reentrancy();
        _entered = true;
        _;
        _entered = false;
    }

    // ---------------------------------------------------------------------
    // Deposits
    // ---------------------------------------------------------------------

    /// Adds `amount` to the channel of `config`, creating it on the first
    /// deposit. `collector` pulls the tokens from the payer (for example with
    /// the payer's ERC-3009 authorization) and must deliver exactly `amount`
    /// to this contract.
    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        nonReentrant
    {
        _requireValidConfig(config);
        if (amount == 0) revert ZeroAmount();
        bytes32 id = getChannelId(config);

        uint256 before = _balanceOf(config.token, address(this));
        IDepositCollector(collector).collect(config.payer, config.token, amount, id, collectorData);
        uint256 received = _balanceOf(config.token, address(this)) - before;
        if (received != amount) revert DepositNotReceived(amount, received);

        ChannelState storage state = channels[id];
        if (state.balance == 0 && state.totalClaimed == 0) emit ChannelCreated(id, config);
        uint128 newBalance = state.balance + amount;
        state.balance = newBalance;
        emit Deposited(id, msg.sender, amount, newBalance);
    }

    // ---------------------------------------------------------------------
    // Claims and settlement
    // ---------------------------------------------------------------------

    /// Claims vouchers; the caller must be the receiver or the receiver's
    /// authorizer of every row.
    function claim(VoucherClaim[] calldata voucherClaims) external nonReentrant {
        if (voucherClaims.length == 0) revert EmptyClaims();
        for (uint256 i; i < voucherClaims.length; ++i) {
            ChannelConfig calldata config = voucherClaims[i].voucher.channel;
            if (msg.sender != config.receiver && msg.sender != config.receiverAuthorizer) {
                revert NotReceiver(getChannelId(config));
            }
            _claim(voucherClaims[i], getChannelId(config));
        }
    }

    /// Claims vouchers of channels sharing one receiver authorizer, whose
    /// `ClaimBatch` signature over all rows lets anyone relay them.
    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        nonReentrant
    {
        if (voucherClaims.length == 0) revert EmptyClaims();
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        if (authorizer == address(0)) revert ReceiverAuthorizerMismatch(getChannelId(voucherClaims[0].voucher.channel));

        bytes32[] memory ids = new bytes32[](voucherClaims.length);
        bytes32[] memory entries = new bytes32[](voucherClaims.length);
        for (uint256 i; i < voucherClaims.length; ++i) {
            VoucherClaim calldata c = voucherClaims[i];
            bytes32 id = getChannelId(c.voucher.channel);
            if (c.voucher.channel.receiverAuthorizer != authorizer) revert ReceiverAuthorizerMismatch(id);
            ids[i] = id;
            entries[i] = keccak256(abi.encode(CLAIM_ENTRY_TYPEHASH, id, c.voucher.maxClaimableAmount, c.totalClaimed));
        }
        bytes32 digest = _hashTypedData(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
        if (!_isValidSignature(authorizer, digest, authorizerSignature)) revert InvalidAuthorizerSignature();

        for (uint256 i; i < voucherClaims.length; ++i) {
            _claim(voucherClaims[i], ids[i]);
        }
    }

    /// Pays `receiver` everything claimed for it in `token` and not yet paid.
    /// Anyone may call it; with nothing to pay it does nothing.
    function settle(address receiver, address token) external nonReentrant {
        ReceiverState storage state = receivers[receiver][token];
        uint128 amount = state.totalClaimed - state.totalSettled;
        if (amount == 0) return;
        state.totalSettled = state.totalClaimed;
        _transfer(token, receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    // ---------------------------------------------------------------------
    // Payer's timed exit
    // ---------------------------------------------------------------------

    /// Starts the payer's exit of up to `amount`; it can be finalized once the
    /// channel's `withdrawDelay` has passed, which gives the receiver that
    /// long to claim its latest vouchers.
    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external {
        bytes32 id = getChannelId(config);
        _requirePayer(config, id);
        if (amount == 0) revert ZeroAmount();
        WithdrawalState storage pending = pendingWithdrawals[id];
        if (pending.initiatedAt != 0) revert WithdrawalAlreadyPending(id);
        pending.amount = amount;
        pending.initiatedAt = uint40(block.timestamp);
        emit WithdrawInitiated(id, amount, uint40(block.timestamp) + config.withdrawDelay);
    }

    /// Returns to the payer the requested amount, or the unclaimed remainder
    /// if that is less.
    function finalizeWithdraw(ChannelConfig calldata config) external nonReentrant {
        bytes32 id = getChannelId(config);
        _requirePayer(config, id);
        WithdrawalState memory pending = pendingWithdrawals[id];
        if (pending.initiatedAt == 0) revert NoPendingWithdrawal(id);
        uint40 finalizeAfter = pending.initiatedAt + config.withdrawDelay;
        if (block.timestamp < finalizeAfter) revert WithdrawDelayNotElapsed(id, finalizeAfter);
        delete pendingWithdrawals[id];

        uint128 amount = _takeUnclaimed(config, id, pending.amount);
        if (amount != 0) _transfer(config.token, config.payer, amount);
        emit WithdrawFinalized(id, msg.sender, amount);
    }

    // ---------------------------------------------------------------------
    // Cooperative refunds
    // ---------------------------------------------------------------------

    /// The receiver (or its authorizer) returns up to `amount` of the
    /// unclaimed remainder to the payer.
    function refund(ChannelConfig calldata config, uint128 amount) external nonReentrant {
        bytes32 id = getChannelId(config);
        if (msg.sender != config.receiver && msg.sender != config.receiverAuthorizer) revert NotReceiver(id);
        _refund(config, id, amount);
    }

    /// A refund anyone may relay, signed by the receiver authorizer for the
    /// channel's current refund nonce.
    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external nonReentrant {
        bytes32 id = getChannelId(config);
        uint256 expected = refundNonce[id];
        if (nonce != expected) revert InvalidRefundNonce(id, expected, nonce);
        if (
            config.receiverAuthorizer == address(0)
                || !_isValidSignature(config.receiverAuthorizer, getRefundDigest(id, nonce, amount), receiverAuthorizerSignature)
        ) revert InvalidRefundSignature(id);
        _refund(config, id, amount);
    }

    // ---------------------------------------------------------------------
    // Batching
    // ---------------------------------------------------------------------

    /// Runs several calls on this contract in one transaction (for example
    /// `claimWithSignature` then `settle`); any failure reverts them all.
    function multicall(bytes[] calldata data) external returns (bytes[] memory results) {
        results = new bytes[](data.length);
        for (uint256 i; i < data.length; ++i) {
            (bool ok, bytes memory result) = address(this).delegatecall(data[i]);
            if (!ok) {
                assembly ("memory-safe") {
                    revert(add(result, 0x20), mload(result))
                }
            }
            results[i] = result;
        }
    }

    // ---------------------------------------------------------------------
    // Views
    // ---------------------------------------------------------------------

    function getChannelId(ChannelConfig calldata config) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(CHANNEL_CONFIG_TYPEHASH, config)));
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _hashTypedData(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) external view returns (bytes32) {
        bytes32[] memory entries = new bytes32[](voucherClaims.length);
        for (uint256 i; i < voucherClaims.length; ++i) {
            VoucherClaim calldata c = voucherClaims[i];
            entries[i] = keccak256(
                abi.encode(CLAIM_ENTRY_TYPEHASH, getChannelId(c.voucher.channel), c.voucher.maxClaimableAmount, c.totalClaimed)
            );
        }
        return _hashTypedData(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }

    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return keccak256(abi.encode(EIP712_DOMAIN_TYPEHASH, NAME_HASH, VERSION_HASH, block.chainid, address(this)));
    }

    // ---------------------------------------------------------------------
    // Internals
    // ---------------------------------------------------------------------

    /// Brings the channel's claimed total up to `c.totalClaimed`. A claim at
    /// or below the recorded total (an old voucher replayed) changes nothing.
    function _claim(VoucherClaim calldata c, bytes32 id) private {
        ChannelConfig calldata config = c.voucher.channel;
        uint128 maxClaimable = c.voucher.maxClaimableAmount;
        address signer = config.payerAuthorizer == address(0) ? config.payer : config.payerAuthorizer;
        if (!_isValidSignature(signer, getVoucherDigest(id, maxClaimable), c.signature)) {
            revert InvalidVoucherSignature(id);
        }
        if (c.totalClaimed > maxClaimable) revert ClaimAboveVoucher(id, c.totalClaimed, maxClaimable);

        ChannelState storage state = channels[id];
        uint128 claimedBefore = state.totalClaimed;
        if (c.totalClaimed <= claimedBefore) return;
        if (c.totalClaimed > state.balance) revert ClaimAboveBalance(id, c.totalClaimed, state.balance);

        uint128 delta = c.totalClaimed - claimedBefore;
        state.totalClaimed = c.totalClaimed;
        receivers[config.receiver][config.token].totalClaimed += delta;
        emit Claimed(id, msg.sender, delta, c.totalClaimed);
    }

    function _refund(ChannelConfig calldata config, bytes32 id, uint128 amount) private {
        refundNonce[id] += 1;
        uint128 refunded = _takeUnclaimed(config, id, amount);
        if (refunded != 0) _transfer(config.token, config.payer, refunded);
        emit Refunded(id, msg.sender, refunded);
    }

    /// Takes up to `amount` of the channel's unclaimed remainder out of its
    /// balance; closes the channel when nothing unclaimed is left.
    function _takeUnclaimed(ChannelConfig calldata config, bytes32 id, uint128 amount) private returns (uint128 taken) {
        ChannelState storage state = channels[id];
        uint128 unclaimed = state.balance - state.totalClaimed;
        taken = amount < unclaimed ? amount : unclaimed;
        state.balance -= taken;
        if (unclaimed == taken && unclaimed != 0) emit ChannelClosed(id, config);
    }

    function _requireValidConfig(ChannelConfig calldata config) private pure {
        if (config.payer == address(0) || config.receiver == address(0) || config.token == address(0)) {
            revert InvalidChannelConfig();
        }
        if (config.withdrawDelay < MIN_WITHDRAW_DELAY || config.withdrawDelay > MAX_WITHDRAW_DELAY) {
            revert InvalidWithdrawDelay();
        }
    }

    function _requirePayer(ChannelConfig calldata config, bytes32 id) private view {
        if (msg.sender != config.payer && (config.payerAuthorizer == address(0) || msg.sender != config.payerAuthorizer)) {
            revert NotPayer(id);
        }
    }

    function _hashTypedData(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked("\x19\x01", DOMAIN_SEPARATOR(), structHash));
    }

    /// A 65-byte ECDSA signature (low s) by `signer`, or, when `signer` is a
    /// contract, its ERC-1271 approval.
    function _isValidSignature(address signer, bytes32 digest, bytes calldata signature) private view returns (bool) {
        if (signer.code.length != 0) {
            (bool ok, bytes memory ret) =
                signer.staticcall(abi.encodeWithSelector(ERC1271_MAGIC, digest, signature));
            return ok && ret.length >= 32 && abi.decode(ret, (bytes4)) == ERC1271_MAGIC;
        }
        if (signature.length != 65) return false;
        bytes32 r = bytes32(signature[0:32]);
        bytes32 s = bytes32(signature[32:64]);
        uint8 v = uint8(signature[64]);
        if (uint256(s) > HALF_CURVE_ORDER || (v != 27 && v != 28)) return false;
        address recovered = ecrecover(digest, v, r, s);
        return recovered != address(0) && recovered == signer;
    }

    function _balanceOf(address token, address account) private view returns (uint256) {
        (bool ok, bytes memory ret) = token.staticcall(abi.encodeWithSelector(0x70a08231, account));
        if (!ok || ret.length < 32) revert TokenTransferFailed();
        return abi.decode(ret, (uint256));
    }

    function _transfer(address token, address to, uint256 amount) private {
        (bool ok, bytes memory ret) = token.call(abi.encodeWithSelector(0xa9059cbb, to, amount));
        if (!ok || (ret.length != 0 && !abi.decode(ret, (bool)))) revert TokenTransferFailed();
    }
}

/// What `deposit` calls to pull a payer's tokens into the channel contract.
interface IDepositCollector {
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external;
}
