// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

/// @title ERC3009DepositCollector
/// @notice Pulls a channel deposit from the payer with an ERC-3009
///         `receiveWithAuthorization` made out to this collector, then hands
///         the tokens to the channel contract.
///
/// `collectorData` is `abi.encode(uint256 validAfter, uint256 validBefore,
/// uint256 salt, bytes signature)`. The authorization's nonce must be
/// `keccak256(abi.encode(channelId, salt))`: a signed deposit can only fund
/// the channel it was signed for.
///
/// Only the channel contract (an immutable of the runtime code) may call
/// `collect`; otherwise anyone holding a deposit's signature could take its
/// tokens.
contract ERC3009DepositCollector {
    address public immutable settlement;

    error OnlySettlement();
    error TokenTransferFailed();

    constructor(address settlement_) {
        settlement = settlement_;
    }

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata collectorData)
        external
    {
        if (msg.sender != settlement) revert OnlySettlement();
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(collectorData, (uint256, uint256, uint256, bytes));
        IReceiveWithAuthorization(token).receiveWithAuthorization(
            payer, address(this), amount, validAfter, validBefore, keccak256(abi.encode(channelId, salt)), signature
        );
        (bool ok, bytes memory ret) = token.call(abi.encodeWithSelector(0xa9059cbb, settlement, amount));
        if (!ok || (ret.length != 0 && !abi.decode(ret, (bool)))) revert TokenTransferFailed();
    }
}

interface IReceiveWithAuthorization {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}
