//! `x402d payment`, `x402d payments` and `x402d channel`: where a
//! merchant's settlements stand, asked of a running node's HTTP listener
//! (`GET /settlements…`, `GET /channels/{id}`) with the merchant's key.

use clap::Args;
use x402_engine::facilitator::status::{ChannelJson, SettlementJson, SettlementsJson};

/// Which node to ask, and as which merchant.
#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    /// The node's HTTP listener.
    #[arg(long, env = "X402D_NODE", default_value = "http://127.0.0.1:8402")]
    node: String,
    /// The merchant's API key: a merchant sees its own payments only.
    #[arg(long, env = "X402D_MERCHANT_KEY", hide_env_values = true)]
    key: String,
    /// Print the node's JSON answer as it is.
    #[arg(long)]
    json: bool,
}

/// What to show.
#[derive(Debug)]
pub(crate) enum Query {
    /// One payment, by id.
    Payment(String),
    /// The merchant's recent payments, or those of one transaction.
    Payments { transaction: Option<String>, limit: usize },
    /// One channel, by id.
    Channel(String),
}

/// Asks the node and prints the answer; an error names the node's words.
pub(crate) async fn show(query: Query, args: NodeArgs) -> anyhow::Result<()> {
    let base = args.node.trim_end_matches('/');
    let path = match &query {
        Query::Payment(id) => format!("/settlements/{id}"),
        Query::Payments { transaction: Some(tx), .. } => format!("/settlements?transaction={tx}"),
        Query::Payments { transaction: None, limit } => format!("/settlements?limit={limit}"),
        Query::Channel(id) => format!("/channels/{id}"),
    };
    let response = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?
        .get(format!("{base}{path}"))
        .bearer_auth(args.key.trim())
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the node at {base}: {e}"))?;
    let status = response.status();
    let body = response.text().await?;
    if !status.is_success() {
        let error = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or(body);
        anyhow::bail!("the node answered {status}: {error}");
    }
    if args.json {
        println!("{body}");
        return Ok(());
    }
    match query {
        Query::Payment(_) => print_payment(&serde_json::from_str(&body)?),
        Query::Payments { .. } => {
            let list: SettlementsJson = serde_json::from_str(&body)?;
            if list.settlements.is_empty() {
                println!("no payments");
            }
            for p in &list.settlements {
                let tx = p.transaction.map(|t| format!("  tx {t}")).unwrap_or_default();
                println!("{}  {:<9}  {:>12}  {}{tx}", p.payment_id, p.state, p.amount, p.strategy);
            }
        }
        Query::Channel(_) => print_channel(&serde_json::from_str(&body)?),
    }
    Ok(())
}

fn print_payment(p: &SettlementJson) {
    println!("payment       {}", p.payment_id);
    println!("state         {}", p.state);
    if let Some(reason) = &p.failure_reason {
        println!("reason        {reason}");
    }
    match (p.transaction, p.block) {
        (Some(tx), Some(block)) => println!("transaction   {tx} (block {block})"),
        (Some(tx), None) => println!("transaction   {tx} (not mined yet)"),
        _ => {}
    }
    println!("merchant      {} ({})", p.merchant, p.strategy);
    println!("amount        {} of {} on {}", p.amount, p.asset, p.network);
    println!("payer         {}", p.payer);
    println!("pay to        {}", p.pay_to);
    println!("valid before  {} (unix s)", p.valid_before);
    println!("accepted      {} (unix ms), last changed {}", p.accepted_at_ms, p.updated_at_ms);
}

fn print_channel(c: &ChannelJson) {
    println!("channel       {}", c.channel_id);
    println!("merchant      {}", c.merchant);
    println!("network       {} (contract {})", c.network, c.contract);
    println!("payer         {}", c.payer);
    println!("receiver      {}", c.receiver);
    println!("token         {}", c.token);
    println!("charged       {} (highest voucher {})", c.charged, c.signed_max_claimable);
    println!("on chain      balance {}, claimed {}, refund nonce {}", c.balance, c.total_claimed, c.refund_nonce);
    if let Some(at) = c.withdraw_finalize_after {
        println!("withdrawal    pending, final after {at} (unix s)");
    }
    println!("read          {} (unix s)", c.synced_at);
}
