//! The `direct` strategy on a real anvil chain: queued payments are settled
//! once each, balances move by exactly the paid amounts, and the ledger and
//! the token's `authorizationState` agree.

use std::{sync::Arc, time::Duration};

use alloy::{
    primitives::{B256, U256},
    providers::{Provider, ProviderBuilder, ext::AnvilApi},
    signers::local::PrivateKeySigner,
};
use x402_chain::{AlloyChain, Chain, TxConfig};
use x402_engine::settle::{Settler, SettlerConfig};
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet as devnet;
use x402_devnet::Anvil;
use x402_devnet::Payer;

const PAYERS: usize = 20;
const PER_PAYER: usize = 10;
const MINTED: u64 = 1_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_payments_settle_exactly_once_with_exact_balances() {
    let anvil = Anvil::spawn(&[]).unwrap();
    let payers: Vec<Payer> = (0..PAYERS).map(|_| Payer::random()).collect();
    let addresses: Vec<_> = payers.iter().map(Payer::address).collect();
    let net = devnet::deploy(anvil.endpoint(), &addresses, U256::from(MINTED)).await.unwrap();
    assert_eq!(net.token, TOKEN);

    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let mut signers = Vec::new();
    for _ in 0..4 {
        let signer = PrivateKeySigner::random();
        provider.anvil_set_balance(signer.address(), U256::from(10u128.pow(20))).await.unwrap();
        signers.push(signer);
    }
    let chain = Arc::new(AlloyChain::connect(anvil.endpoint(), signers, TxConfig::default()).await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&config_value(dir.path())).await;
    let settler = Settler::spawn(node.engine().clone(), chain.clone(), SettlerConfig::default(), None);

    // 200 payments to the direct merchant m1 over one stream ...
    let requests: Vec<_> =
        (0..PAYERS * PER_PAYER).map(|i| signed_submit(&payers[i % PAYERS], PAY_TO, i as u64)).collect();
    let mut m1 = payments(node.endpoints().grpc, M1_KEY).await;
    let accepted = stream_all(&mut m1, requests).await;
    assert!(accepted.iter().all(|r| outcome(r) == pb::Outcome::Accepted));
    // ... and a few to the batched merchant m2, which go in one batch.
    let mut m2 = payments(node.endpoints().grpc, M2_KEY).await;
    let batched = stream_all(&mut m2, (0..5).map(|i| signed_submit(&payers[i], PAY_TO_2, i as u64)).collect()).await;

    let confirmed = |p: &pb::Payment| p.status.as_ref().unwrap().state == pb::PaymentState::Confirmed as i32;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut settled = Vec::new();
    loop {
        settled.clear();
        for resp in &accepted {
            let get = pb::GetPaymentRequest { payment_id: resp.payment_id.clone() };
            settled.push(m1.get_payment(get).await.unwrap().into_inner());
        }
        let mut batch = Vec::new();
        for resp in &batched {
            let get = pb::GetPaymentRequest { payment_id: resp.payment_id.clone() };
            batch.push(m2.get_payment(get).await.unwrap().into_inner());
        }
        if settled.iter().all(confirmed) && batch.iter().all(confirmed) {
            let txs: std::collections::HashSet<_> =
                batch.iter().map(|p| p.status.as_ref().unwrap().transaction.clone()).collect();
            assert_eq!(txs.len(), 1, "the batched payments share one transaction");
            break;
        }
        let states: Vec<_> = settled.iter().map(|p| p.status.as_ref().unwrap().state).collect();
        assert!(tokio::time::Instant::now() < deadline, "not all confirmed in time: {states:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    settler.abort();

    // Balances moved by exactly the paid amounts.
    let total = U256::from(AMOUNT * (PAYERS * PER_PAYER) as u64);
    assert_eq!(chain.token_balance(TOKEN, PAY_TO).await.unwrap(), total);
    assert_eq!(chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), U256::from(AMOUNT * batched.len() as u64));
    for (i, payer) in addresses.iter().enumerate() {
        let paid = PER_PAYER as u64 + u64::from(i < batched.len());
        assert_eq!(chain.token_balance(TOKEN, *payer).await.unwrap(), U256::from(MINTED - AMOUNT * paid));
    }
    // The ledger and the token agree on every payment, each with its own transaction.
    let mut txs = std::collections::HashSet::new();
    for p in &settled {
        let a = p.authorization.as_ref().unwrap();
        let from = alloy::primitives::Address::from_slice(&a.from);
        let nonce = B256::from_slice(&a.nonce);
        assert!(chain.authorization_state(TOKEN, from, nonce).await.unwrap());
        let status = p.status.as_ref().unwrap();
        assert!(status.block > 0);
        assert!(txs.insert(status.transaction.clone()), "one transaction per payment");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payer_who_spends_elsewhere_fails_with_insufficient_balance() {
    let anvil = Anvil::spawn(&[]).unwrap();
    let honest = Payer::random();
    let spender = Payer::random();
    devnet::deploy(anvil.endpoint(), &[honest.address(), spender.address()], U256::from(AMOUNT * 2)).await.unwrap();
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let signer = PrivateKeySigner::random();
    provider.anvil_set_balance(signer.address(), U256::from(10u128.pow(20))).await.unwrap();
    let chain = Arc::new(AlloyChain::connect(anvil.endpoint(), vec![signer], TxConfig::default()).await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&config_value(dir.path())).await;
    let mut m1 = payments(node.endpoints().grpc, M1_KEY).await;
    let requests =
        vec![signed_submit(&honest, PAY_TO, 0), signed_submit(&spender, PAY_TO, 1), signed_submit(&honest, PAY_TO, 2)];
    let accepted = stream_all(&mut m1, requests).await;
    assert!(accepted.iter().all(|r| outcome(r) == pb::Outcome::Accepted));

    // Before settlement, the spender moves its whole balance elsewhere with
    // an authorization of its own.
    let mut elsewhere = requirements(alloy::primitives::Address::repeat_byte(0x99));
    elsewhere.amount = U256::from(AMOUNT * 2);
    let drain = spender.sign_exact(&elsewhere, now() - 600, now() + 3600, random_nonce());
    let signature: [u8; 65] = drain.signature.as_slice().try_into().unwrap();
    let calldata =
        x402_chain::eip3009::transfer_with_authorization_calldata(&(&drain.authorization).into(), &signature);
    let tx = chain.sign_call(TOKEN, calldata, None).await.unwrap();
    chain.broadcast(&tx).await.unwrap();
    assert!(chain.wait_receipt(&[tx.hash], Duration::from_secs(20)).await.unwrap().unwrap().success);

    let settler = Settler::spawn(node.engine().clone(), chain.clone(), SettlerConfig::default(), None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let states = loop {
        let mut states = Vec::new();
        for resp in &accepted {
            let get = pb::GetPaymentRequest { payment_id: resp.payment_id.clone() };
            states.push(m1.get_payment(get).await.unwrap().into_inner().status.unwrap());
        }
        if states
            .iter()
            .all(|s| s.state == pb::PaymentState::Confirmed as i32 || s.state == pb::PaymentState::Failed as i32)
        {
            break states;
        }
        assert!(tokio::time::Instant::now() < deadline, "{states:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    settler.abort();
    assert_eq!(states[0].state, pb::PaymentState::Confirmed as i32);
    assert_eq!(states[2].state, pb::PaymentState::Confirmed as i32);
    assert_eq!(states[1].state, pb::PaymentState::Failed as i32);
    assert_eq!(states[1].failure_reason, "invalid_exact_evm_insufficient_balance");
    assert_eq!(chain.token_balance(TOKEN, PAY_TO).await.unwrap(), U256::from(AMOUNT * 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_broadcast_and_receipt_settles_each_payment_once() {
    let anvil = Anvil::spawn(&[]).unwrap();
    let payer = Payer::random();
    devnet::deploy(anvil.endpoint(), &[payer.address()], U256::from(MINTED)).await.unwrap();
    let signer = PrivateKeySigner::random();
    devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await.unwrap();
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    // From now on transactions wait in the mempool until a block is mined by hand.
    provider.anvil_set_auto_mine(false).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let chain = ChainSection::new(anvil.endpoint(), &signer, None, "");
    let config = format!("{}{}", config(dir.path()), chain.toml);
    let env = chain.env(&[]);
    let mut daemon = Daemon::start_with_env(dir.path(), &config, &env);
    let mut m1 = payments(daemon.grpc, M1_KEY).await;
    let accepted = stream_all(&mut m1, (0..5).map(|i| signed_submit(&payer, PAY_TO, i)).collect()).await;
    assert!(accepted.iter().all(|r| outcome(r) == pb::Outcome::Accepted));

    let state_of = |client: &mut Payments, id: Vec<u8>| {
        let mut client = client.clone();
        async move {
            client.get_payment(pb::GetPaymentRequest { payment_id: id }).await.unwrap().into_inner().status.unwrap()
        }
    };
    // Wait until every payment is broadcast (Submitted) but none is mined.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut submitted = 0;
        for r in &accepted {
            if state_of(&mut m1, r.payment_id.clone()).await.state == pb::PaymentState::Submitted as i32 {
                submitted += 1;
            }
        }
        if submitted == accepted.len() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{submitted} submitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.kill();

    // The transactions are mined while x402d is down ...
    provider.anvil_mine(Some(1), None).await.unwrap();
    provider.anvil_set_auto_mine(true).await.unwrap();

    // ... and after a restart every payment is concluded from its receipt, once.
    let daemon = Daemon::start_with_env(dir.path(), &config, &env);
    let mut m1 = payments(daemon.grpc, M1_KEY).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for r in &accepted {
        loop {
            let status = state_of(&mut m1, r.payment_id.clone()).await;
            if status.state == pb::PaymentState::Confirmed as i32 {
                assert!(status.block > 0);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{status:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let chain = AlloyChain::connect(anvil.endpoint(), Vec::new(), TxConfig::default()).await.unwrap();
    assert_eq!(chain.token_balance(TOKEN, PAY_TO).await.unwrap(), U256::from(AMOUNT * 5));
    assert_eq!(chain.token_balance(TOKEN, payer.address()).await.unwrap(), U256::from(MINTED - AMOUNT * 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_for_ten_seconds_mid_settlement_settles_each_payment_once() {
    let anvil = Anvil::spawn(&[]).unwrap();
    let payers: Vec<Payer> = (0..10).map(|_| Payer::random()).collect();
    let addresses: Vec<_> = payers.iter().map(Payer::address).collect();
    devnet::deploy(anvil.endpoint(), &addresses, U256::from(MINTED)).await.unwrap();
    // A block a second, so settlement is still going on when the node stops.
    devnet::set_interval_mining(anvil.endpoint(), 1).await.unwrap();
    let signers: Vec<_> = (0..2).map(|_| PrivateKeySigner::random()).collect();
    devnet::fund_ether(anvil.endpoint(), &signers.iter().map(PrivateKeySigner::address).collect::<Vec<_>>())
        .await
        .unwrap();
    let chain = Arc::new(AlloyChain::connect(anvil.endpoint(), signers, TxConfig::default()).await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&config_value(dir.path())).await;
    let mut m1 = payments(node.endpoints().grpc, M1_KEY).await;
    let accepted =
        stream_all(&mut m1, (0..100).map(|i| signed_submit(&payers[i % 10], PAY_TO, i as u64)).collect()).await;
    assert!(accepted.iter().all(|r| outcome(r) == pb::Outcome::Accepted));
    let config = SettlerConfig { max_in_flight: 20, ..SettlerConfig::default() };
    let settler = Settler::spawn(node.engine().clone(), chain.clone(), config, None);

    let states = |mut client: Payments| {
        let ids: Vec<_> = accepted.iter().map(|r| r.payment_id.clone()).collect();
        async move {
            let mut out = Vec::new();
            for id in ids {
                let get = pb::GetPaymentRequest { payment_id: id };
                out.push(client.get_payment(get).await.unwrap().into_inner().status.unwrap().state);
            }
            out
        }
    };
    let confirmed = pb::PaymentState::Confirmed as i32;
    // Once settlement is under way, the node stops for 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !states(m1.clone()).await.contains(&confirmed) {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = anvil.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let at_stop = states(m1.clone()).await;
    assert!(at_stop.iter().any(|s| *s != confirmed), "the stop landed mid-settlement: {at_stop:?}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let now = states(m1.clone()).await;
        if now.iter().all(|s| *s == confirmed) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{now:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    settler.abort();
    assert_eq!(chain.token_balance(TOKEN, PAY_TO).await.unwrap(), U256::from(AMOUNT * 100));
    for payer in &addresses {
        assert_eq!(chain.token_balance(TOKEN, *payer).await.unwrap(), U256::from(MINTED - AMOUNT * 10));
    }
}

/// Each direct payment's gas is estimated for it: a payee's first receipt
/// of the token costs ~17k more gas than a later one, so a limit learned
/// from a warm payee would run a cold payee's payment out of gas (and an
/// out-of-gas transaction is x402d's cost, paid again at each retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_payment_to_a_payee_receiving_its_first_tokens_has_gas_enough() {
    use x402_engine::config::PolicyConfig;
    const COLD: alloy::primitives::Address = alloy::primitives::address!("0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc");
    let anvil = Anvil::spawn(&[]).unwrap();
    let payers: Vec<Payer> = (0..3).map(|_| Payer::random()).collect();
    // m1's payee holds tokens from the start: every payment to it is the
    // cheap kind, the first one x402d estimates included.
    let addresses: Vec<_> = payers.iter().map(Payer::address).chain([PAY_TO]).collect();
    devnet::deploy(anvil.endpoint(), &addresses, U256::from(MINTED)).await.unwrap();
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let signer = PrivateKeySigner::random();
    provider.anvil_set_balance(signer.address(), U256::from(10u128.pow(20))).await.unwrap();
    let address = signer.address();
    let chain = Arc::new(AlloyChain::connect(anvil.endpoint(), vec![signer], TxConfig::default()).await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let mut config = config_value(dir.path());
    config.merchants.push(merchant_config("cold", COLD, "test-merchant-cold-key-0123", PolicyConfig::Direct));
    let node = start_node(&config).await;
    let settler = Settler::spawn(node.engine().clone(), chain.clone(), SettlerConfig::default(), None);
    let confirmed = |client: Payments, id: Vec<u8>| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let get = pb::GetPaymentRequest { payment_id: id.clone() };
            let status = client.clone().get_payment(get).await.unwrap().into_inner().status.unwrap();
            if status.state == pb::PaymentState::Confirmed as i32 {
                return;
            }
            assert_ne!(status.state, pb::PaymentState::Failed as i32, "failed: {}", status.failure_reason);
            assert!(tokio::time::Instant::now() < deadline, "not confirmed in time: {status:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    let m1 = payments(node.endpoints().grpc, M1_KEY).await;
    for (i, payer) in payers[..2].iter().enumerate() {
        let answer = m1.clone().submit(signed_submit(payer, PAY_TO, i as u64)).await.unwrap().into_inner();
        confirmed(m1.clone(), answer.payment_id).await;
    }
    // Then a payee receiving its first tokens.
    let cold = payments(node.endpoints().grpc, "test-merchant-cold-key-0123").await;
    let answer = cold.clone().submit(signed_submit(&payers[2], COLD, 9)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    confirmed(cold, answer.payment_id).await;
    settler.abort();
    assert_eq!(chain.token_balance(TOKEN, COLD).await.unwrap(), U256::from(AMOUNT));
    assert_eq!(
        provider.get_transaction_count(address).await.unwrap(),
        3,
        "one transaction per payment, none out of gas"
    );
}

/// A chain whose clock lags x402d's refuses an authorization as "not yet
/// valid" although x402d accepted it: the payment stays queued (direct and
/// batched alike) and is settled once the chain's time passes `validAfter`,
/// never recorded `Failed` for good (the payer was served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_not_yet_valid_on_a_lagging_chain_stays_queued_until_it_is() {
    let lag = 3600;
    let anvil = Anvil::spawn(&["--timestamp", &(now() - lag).to_string()]).unwrap();
    let payer = Payer::random();
    devnet::deploy(anvil.endpoint(), &[payer.address()], U256::from(MINTED)).await.unwrap();
    let signer = PrivateKeySigner::random();
    devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await.unwrap();
    // Through a proxy that counts the simulations.
    let proxy = RpcProxy::start(anvil.endpoint()).await;
    let chain = Arc::new(AlloyChain::connect(&proxy.url, vec![signer], TxConfig::default()).await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&config_value(dir.path())).await;
    // Valid from ten minutes ago by x402d's clock, fifty minutes ahead of the chain's.
    let mut m1 = payments(node.endpoints().grpc, M1_KEY).await;
    let mut m2 = payments(node.endpoints().grpc, M2_KEY).await;
    let direct = m1.submit(signed_submit(&payer, PAY_TO, 0)).await.unwrap().into_inner();
    let batched = m2.submit(signed_submit(&payer, PAY_TO_2, 1)).await.unwrap().into_inner();
    assert_eq!(outcome(&direct), pb::Outcome::Accepted, "{}", direct.message);
    assert_eq!(outcome(&batched), pb::Outcome::Accepted, "{}", batched.message);

    let config = SettlerConfig { poll: Duration::from_millis(100), ..SettlerConfig::default() };
    let settler = Settler::spawn(node.engine().clone(), chain.clone(), config, None);
    let state = |client: &Payments, id: &[u8]| {
        let mut client = client.clone();
        let get = pb::GetPaymentRequest { payment_id: id.to_vec() };
        async move { client.get_payment(get).await.unwrap().into_inner().status.unwrap() }
    };
    // Several rounds of settlement see the chain refuse them: still queued.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (client, id) in [(&m1, &direct.payment_id), (&m2, &batched.payment_id)] {
        let status = state(client, id).await;
        assert_eq!(status.state, pb::PaymentState::Queued as i32, "{status:?}");
    }
    assert_eq!(chain.token_balance(TOKEN, PAY_TO).await.unwrap(), U256::ZERO);
    // ... and not for want of trying: each was simulated round after round.
    const TRANSFER_WITH_AUTHORIZATION: [u8; 4] = [0xe3, 0xee, 0x16, 0x0e];
    const AGGREGATE3: [u8; 4] = [0x82, 0xad, 0x56, 0xcb];
    let (direct_tries, batch_tries) = (proxy.eth_calls(TRANSFER_WITH_AUTHORIZATION), proxy.eth_calls(AGGREGATE3));
    assert!(direct_tries >= 3 && batch_tries >= 3, "simulated {direct_tries} and {batch_tries} times");

    // The chain's clock catches up: both are settled, once.
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    provider.anvil_set_time(now()).await.unwrap();
    provider.anvil_mine(Some(1), None).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (client, id) in [(&m1, &direct.payment_id), (&m2, &batched.payment_id)] {
        loop {
            let status = state(client, id).await;
            if status.state == pb::PaymentState::Confirmed as i32 {
                break;
            }
            assert_ne!(status.state, pb::PaymentState::Failed as i32, "{status:?}");
            assert!(tokio::time::Instant::now() < deadline, "{status:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    settler.abort();
    assert_eq!(chain.token_balance(TOKEN, PAY_TO).await.unwrap(), U256::from(AMOUNT));
    assert_eq!(chain.token_balance(TOKEN, PAY_TO_2).await.unwrap(), U256::from(AMOUNT));
}

/// A node whose clock is 2 minutes behind reads no earlier than the chain's
/// latest block: an authorization the token already refuses as expired
/// (its `validBefore` 30 s past) is refused, not served unpaid, and one
/// still valid is accepted and settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_behind_the_chain_does_not_accept_an_expired_authorization() {
    use alloy::providers::ext::AnvilApi;
    let s = crate::channels::Setup::new(1).await;
    // A fresh block: the chain's time is now.
    s.wallet.evm_mine(None).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = s.node_config(dir.path(), crate::channels::Setup::merchant(3600), |_| {});
    let clock = x402_engine::domain::Clock::stepping();
    clock.step(-120_000);
    let node = x402_engine::node::Node::start_with_clock(&config, clock.clone()).await.unwrap();
    let mut client = payments(node.endpoints().grpc, M1_KEY).await;
    let payer = &s.payers[0];
    let req = requirements(PAY_TO);
    let expired = payer.sign_exact(&req, now() - 600, now() - 30, random_nonce());
    let answer = client.submit(exact_submit(1, &req, &expired)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "{answer:?}");
    assert_eq!(answer.reason, "invalid_exact_evm_payload_authorization_valid_before", "{answer:?}");
    let valid = payer.sign_exact(&req, now() - 600, now() + 600, random_nonce());
    let answer = client.submit(exact_submit(2, &req, &valid)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{answer:?}");
    let id = x402_engine::domain::PaymentId(alloy::primitives::B256::from_slice(&answer.payment_id));
    crate::channels::eventually(30, "the valid payment settled", || async {
        node.engine().payment(id).await.unwrap().unwrap().status.state == x402_engine::domain::PaymentState::Confirmed
    })
    .await;
}
