//! Metric names, in one place. Labels are bounded: reasons, stages and
//! strategies, never an address.

use crate::reason::Reason;

/// Payments accepted and durably recorded.
pub(crate) const PAYMENTS_ACCEPTED: &str = "x402d_payments_accepted_total";
/// `eth_call`s proving signatures of payers with code.
pub(crate) const SIGNATURE_CALLS: &str = "x402d_signature_calls_total";
/// Signatures of payers with code proved, counted once per call they were
/// in (a row proved again after a starved batch counts again).
pub(crate) const SIGNATURE_PROOFS: &str = "x402d_signature_proofs_total";
/// Payments answered DUPLICATE.
pub(crate) const PAYMENTS_DUPLICATE: &str = "x402d_payments_duplicate_total";
/// Payments rejected, by `reason`.
pub(crate) const PAYMENTS_REJECTED: &str = "x402d_payments_rejected_total";
/// Malformed submits, answered `INVALID_ARGUMENT`.
pub(crate) const SUBMITS_INVALID: &str = "x402d_submits_invalid_total";
/// Submits refused because the pipeline was full.
pub(crate) const SUBMITS_OVERLOADED: &str = "x402d_submits_overloaded_total";
/// Items waiting in a pipeline queue, by `stage`.
pub(crate) const QUEUE_DEPTH: &str = "x402d_pipeline_queue_depth";
/// Duration of one group commit (write + fsync).
pub(crate) const COMMIT_SECONDS: &str = "x402d_ledger_commit_seconds";
/// Items per group commit.
pub(crate) const COMMIT_GROUP_SIZE: &str = "x402d_ledger_commit_group_size";
/// Failed group commits.
pub(crate) const COMMIT_ERRORS: &str = "x402d_ledger_commit_errors_total";
/// Payments waiting for settlement, by `strategy`.
pub(crate) const SETTLEMENT_QUEUE_DEPTH: &str = "x402d_settlement_queue_depth";
/// Rows per settlement batch.
pub(crate) const BATCH_ROWS: &str = "x402d_settlement_batch_rows";
/// Gas per confirmed payment, by `strategy`.
pub(crate) const GAS_PER_PAYMENT: &str = "x402d_settlement_gas_per_payment";
/// Time from acceptance to confirmation, by `strategy`.
pub(crate) const ACCEPT_TO_CONFIRM_SECONDS: &str = "x402d_settlement_accept_to_confirm_seconds";
/// Settlement transactions replaced by a fee bump.
pub(crate) const FEE_BUMPS: &str = "x402d_settlement_fee_bumps_total";
/// Included settlement transactions whose block a reorg replaced.
pub(crate) const REORGS: &str = "x402d_settlement_reorgs_total";

/// Describes every metric and registers the labelled counters at zero, so a
/// scrape shows them before the first event.
pub(crate) fn describe() {
    metrics::describe_counter!(PAYMENTS_ACCEPTED, "Payments verified and durably recorded");
    metrics::describe_histogram!(CLAIM_ROWS, "Channel rows per claim transaction");
    metrics::describe_gauge!(CLAIMS_QUARANTINED, "Channels left out of claims because their claim reverts");
    metrics::describe_gauge!(
        CLAIMS_QUARANTINED_WITHDRAWING,
        "Quarantined channels whose payer started a withdrawal: their charges are lost when its delay ends"
    );
    metrics::describe_counter!(VOUCHERS_ACCEPTED, "batch-settlement vouchers verified and durably recorded");
    metrics::describe_counter!(PAYMENTS_DUPLICATE, "Submits of an already accepted payment");
    metrics::describe_counter!(SIGNATURE_CALLS, "eth_calls proving signatures of payers with code");
    metrics::describe_counter!(SIGNATURE_PROOFS, "Signatures of payers with code proved, per call they were in");
    metrics::describe_counter!(PAYMENTS_REJECTED, "Payments rejected, by x402 reason");
    metrics::describe_counter!(SUBMITS_INVALID, "Malformed submits");
    metrics::describe_counter!(SUBMITS_OVERLOADED, "Submits refused because the pipeline was full");
    metrics::describe_gauge!(QUEUE_DEPTH, "Items waiting in a pipeline queue");
    metrics::describe_histogram!(COMMIT_SECONDS, metrics::Unit::Seconds, "Ledger group commit duration");
    metrics::describe_histogram!(COMMIT_GROUP_SIZE, "Items per ledger group commit");
    metrics::describe_counter!(COMMIT_ERRORS, "Failed ledger group commits");
    metrics::describe_gauge!(SETTLEMENT_QUEUE_DEPTH, "Payments waiting for settlement");
    metrics::describe_histogram!(BATCH_ROWS, "Rows per settlement batch transaction");
    metrics::describe_histogram!(GAS_PER_PAYMENT, "Gas per confirmed payment");
    metrics::describe_histogram!(
        ACCEPT_TO_CONFIRM_SECONDS,
        metrics::Unit::Seconds,
        "Time from a payment's acceptance to its confirmation"
    );
    metrics::describe_counter!(FEE_BUMPS, "Settlement transactions replaced by a fee bump");
    metrics::describe_counter!(REORGS, "Included settlement transactions whose block a reorg replaced");
    metrics::counter!(PAYMENTS_ACCEPTED).absolute(0);
    metrics::counter!(PAYMENTS_DUPLICATE).absolute(0);
    metrics::counter!(FEE_BUMPS).absolute(0);
    metrics::counter!(REORGS).absolute(0);
    for reason in Reason::ALL {
        metrics::counter!(PAYMENTS_REJECTED, "reason" => reason.code()).absolute(0);
    }
}

/// Channel rows per claim transaction.
pub(crate) const CLAIM_ROWS: &str = "x402d_channel_claim_rows";
/// Channels left out of claims because their claim reverts.
pub(crate) const CLAIMS_QUARANTINED: &str = "x402d_channel_claims_quarantined";
/// Quarantined channels whose payer started a withdrawal.
pub(crate) const CLAIMS_QUARANTINED_WITHDRAWING: &str = "x402d_channel_claims_quarantined_withdrawing";
/// Vouchers accepted (`batch-settlement`).
pub(crate) const VOUCHERS_ACCEPTED: &str = "x402d_vouchers_accepted_total";

pub(crate) fn rejected(reason: Reason) {
    metrics::counter!(PAYMENTS_REJECTED, "reason" => reason.code()).increment(1);
}
