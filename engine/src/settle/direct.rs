//! The `direct` strategy: one `transferWithAuthorization` transaction per
//! payment.

use x402_chain::Chain;

use super::{Settler, classify_revert};
use crate::{
    Result,
    domain::{PaymentRecord, PaymentState},
    pipeline::Transition,
    reason::Reason,
};

impl<C: Chain> Settler<C> {
    /// Takes one payment from `Queued` to `Confirmed`, `Failed` or
    /// `Expired`: checks its deadline, simulates, signs, records the intent
    /// and `Submitted`, broadcasts and follows the transaction.
    pub(super) async fn settle_direct(&self, payment: PaymentRecord) -> Result<()> {
        let a = &payment.authorization;
        if self.expired(a.valid_before_secs(), self.config.expiry_margin_secs, &mut None).await? {
            let mut expired = self.status(PaymentState::Expired);
            expired.failure_reason = Some(Reason::ValidBefore.code().into());
            return self.record(Vec::new(), vec![Transition { id: payment.id, status: expired }]).await;
        }
        if let Some(revert) = self.simulate_payment(&payment).await? {
            let reason = classify_revert(&revert);
            if reason == Reason::ValidAfter.code() {
                // Not valid yet on chain (its clock lags ours): still queued,
                // tried again next round, until its deadline.
                return Ok(());
            }
            let spent =
                if reason == Reason::NonceAlreadyUsed.code() { self.spent_elsewhere(&payment).await? } else { None };
            let failed = spent.unwrap_or_else(|| {
                let mut failed = self.status(PaymentState::Failed);
                failed.failure_reason = Some(reason.into());
                failed
            });
            return self.record(Vec::new(), vec![Transition { id: payment.id, status: failed }]).await;
        }
        // Estimated for this payment: a payee's first receipt of the token
        // costs ~17k more gas than a later one, so one estimate per kind of
        // call would run some payments out of gas.
        let (to, calldata) = self.settlement_call(&payment);
        let gas = self.chain.estimate_gas(to, calldata.clone()).await?;
        let tx = self.chain.sign_call(to, calldata, Some(gas)).await?;
        let submitted =
            vec![Transition { id: payment.id, status: self.status_with_tx(PaymentState::Submitted, tx.hash, None) }];
        self.send(tx, vec![payment.id], submitted).await
    }
}
