//! The `direct` strategy: one `transferWithAuthorization` transaction per
//! payment.

use x402_chain::Chain;

use super::{Settler, chain_error, classify_revert, status, status_with_tx, transfer_call};
use crate::{
    Result,
    domain::{PaymentRecord, PaymentState, unix_millis},
    pipeline::Transition,
    reason::Reason,
};

impl<C: Chain> Settler<C> {
    /// Takes one payment from `Queued` to `Confirmed`, `Failed` or
    /// `Expired`: checks its deadline, simulates, signs, records the intent
    /// and `Submitted`, broadcasts and follows the transaction.
    pub(super) async fn settle_direct(&self, payment: PaymentRecord) -> Result<()> {
        let a = &payment.authorization;
        if a.valid_before_secs() <= unix_millis() / 1000 + self.config.expiry_margin_secs {
            let mut expired = status(PaymentState::Expired);
            expired.failure_reason = Some(Reason::ValidBefore.code().into());
            return self.record(Vec::new(), vec![Transition { id: payment.id, status: expired }]).await;
        }
        let calldata = transfer_call(&payment);
        if let Some(revert) = self.chain.simulate(payment.asset, calldata.clone()).await.map_err(chain_error)? {
            let mut failed = status(PaymentState::Failed);
            failed.failure_reason = Some(classify_revert(&revert).into());
            return self.record(Vec::new(), vec![Transition { id: payment.id, status: failed }]).await;
        }
        let tx = self.chain.sign_call(payment.asset, calldata, None).await.map_err(chain_error)?;
        let submitted =
            vec![Transition { id: payment.id, status: status_with_tx(PaymentState::Submitted, tx.hash, None) }];
        self.send(tx, vec![payment.id], submitted).await
    }
}
