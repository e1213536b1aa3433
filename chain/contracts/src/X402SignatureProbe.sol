// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

/// @title X402SignatureProbe
/// @notice Runs many checks in one `eth_call`, each alone: x402d places this
///         code at an unused address with a state override and calls
///         `probe`. Each probe runs in a sub-call with its own gas allowance
///         whose effects are undone (it ends in a revert carrying its
///         outcome), so one probe can neither starve the others of gas nor
///         leave them state (a wallet another probe's factory deployed).
///         Never deployed, never sent in a transaction.
///
/// A probe optionally calls `factory` with `factoryCalldata` first (ERC-6492:
/// the deployment of a counterfactual wallet), which must succeed, then
/// calls `target` with `data`: a token's `transferWithAuthorization`, which
/// checks the payer's signature as it will when settled, or (`isStatic`) a
/// wallet's `isValidSignature`, by STATICCALL as a verifying contract makes
/// it.
contract X402SignatureProbe {
    struct Probe {
        address factory;
        bytes factoryCalldata;
        address target;
        bytes data;
        bool isStatic;
    }

    /// How a probe ended.
    enum Outcome {
        /// The call returned (`data`: its return data).
        Returned,
        /// The call reverted (`data`: its revert data).
        Reverted,
        /// The factory call failed (`data`: its revert data).
        FactoryFailed,
        /// The probe ran out of its gas allowance.
        OutOfGas,
        /// Not run: too little gas was left in the `eth_call` to give it its
        /// allowance. Ask again.
        NotRun
    }

    /// The outcome of a probe, carried out of its sub-call by a revert.
    error Ended(bool returned, bool factoryFailed, bytes data);

    /// Runs each of `probes` alone with at most `gasPerProbe` gas.
    function probe(Probe[] calldata probes, uint256 gasPerProbe)
        external
        returns (Outcome[] memory outcomes, bytes[] memory data)
    {
        uint256 n = probes.length;
        outcomes = new Outcome[](n);
        data = new bytes[](n);
        for (uint256 i = 0; i < n; ++i) {
            // A sub-call gets at most 63/64 of what is left: without room
            // for the whole allowance, the probe is not run at all.
            if (gasleft() < gasPerProbe + gasPerProbe / 63 + 50_000) {
                for (uint256 j = i; j < n; ++j) {
                    outcomes[j] = Outcome.NotRun;
                }
                break;
            }
            try this.run{gas: gasPerProbe}(probes[i]) {
                // `run` never returns normally.
                outcomes[i] = Outcome.OutOfGas;
            } catch (bytes memory reason) {
                (outcomes[i], data[i]) = _decode(reason);
            }
        }
    }

    /// Return or revert data kept of a call: enough for a bytes4 answer or
    /// a revert reason, never a hostile contract's megabytes.
    uint256 private constant KEPT = 256;

    /// One probe; always reverts with its outcome, undoing what it did.
    function run(Probe calldata p) external {
        require(msg.sender == address(this));
        if (p.factory != address(0)) {
            (bool deployed, bytes memory why) = p.factory.call(p.factoryCalldata);
            if (!deployed) revert Ended(false, true, _kept(why));
        }
        bool ok;
        bytes memory ret;
        if (p.isStatic) {
            (ok, ret) = p.target.staticcall(p.data);
        } else {
            (ok, ret) = p.target.call(p.data);
        }
        revert Ended(ok, false, _kept(ret));
    }

    /// The first `KEPT` bytes of `data`, in place.
    function _kept(bytes memory data) private pure returns (bytes memory) {
        if (data.length > KEPT) {
            assembly ("memory-safe") {
                mstore(data, KEPT)
            }
        }
        return data;
    }

    /// The code size of each of `accounts` (payers whose code may have
    /// changed since they were accepted).
    function codeSizes(address[] calldata accounts) external view returns (uint256[] memory sizes) {
        sizes = new uint256[](accounts.length);
        for (uint256 i = 0; i < accounts.length; ++i) {
            sizes[i] = accounts[i].code.length;
        }
    }

    function _decode(bytes memory reason) private pure returns (Outcome, bytes memory) {
        // Anything but `Ended` (no data at all: out of gas) is the probe
        // running out of its allowance (`run` keeps at most `KEPT` bytes of
        // any answer, so a bigger outcome is not one of its own).
        if (reason.length < 4 || reason.length > 1024 || bytes4(reason) != Ended.selector) {
            return (Outcome.OutOfGas, "");
        }
        // The arguments of `Ended`, in place: a length word written over the
        // selector's end (`reason` is not read again).
        bytes memory body;
        assembly ("memory-safe") {
            body := add(reason, 4)
            mstore(body, sub(mload(reason), 4))
        }
        (bool returned, bool factoryFailed, bytes memory data) = abi.decode(body, (bool, bool, bytes));
        if (factoryFailed) return (Outcome.FactoryFailed, data);
        return (returned ? Outcome.Returned : Outcome.Reverted, data);
    }
}
