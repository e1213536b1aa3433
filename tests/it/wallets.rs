//! Payers with code, on a real anvil: an ERC-1271 contract wallet, a
//! counterfactual (ERC-6492) wallet that its first settlement deploys, and
//! an EOA delegated by a real EIP-7702 transaction. Their payments are
//! proved on chain (Multicall3 `aggregate3` of `isValidSignature`) and
//! settle through `direct` and `batched`, with the token checking them as
//! FiatToken 2.2 does; forged signatures from each are refused, and so is a
//! factory that is not on the allowlist.

use alloy::{
    eips::eip7702::Authorization as Delegation,
    network::{TransactionBuilder, TransactionBuilder7702},
    primitives::{Address, B256, Bytes, U256},
    providers::Provider,
    rpc::types::TransactionRequest,
    signers::SignerSync,
    sol_types::SolCall,
};
use x402_chain::{
    contracts::{X402TestDelegate, X402TestToken, X402TestWallet, X402TestWalletFactory},
    signature::Erc6492,
};
use x402_devnet::Payer;
use x402_engine::domain::Requirements;
use x402_proto::v1 as pb;
use x402_wire::ExactPayload;

use crate::{
    channels::Setup,
    common::*,
    status::{get, state_becomes},
};

/// What the test deployed.
struct Wallets {
    factory: Address,
    /// Its wallets are refused: it is not on the allowlist.
    rogue_factory: Address,
    /// Owned by `owner`, deployed.
    wallet: Address,
    owner: Payer,
    /// Owns counterfactual wallets of the factory (not deployed).
    counterfactual_owner: Payer,
    /// Delegated to the test delegate by EIP-7702.
    delegated: Payer,
}

async fn deploy_wallets(s: &Setup) -> Wallets {
    let factory = *X402TestWalletFactory::deploy(&s.wallet).await.unwrap().address();
    let rogue_factory = *X402TestWalletFactory::deploy(&s.wallet).await.unwrap().address();
    let owner = Payer::random();
    let wallet = *X402TestWallet::deploy(&s.wallet, owner.address()).await.unwrap().address();
    let delegate = *X402TestDelegate::deploy(&s.wallet).await.unwrap().address();

    let delegated = Payer::random();
    delegate_to(s, &delegated, delegate).await;
    let code = s.wallet.get_code_at(delegated.address()).await.unwrap();
    assert_eq!(&code[..3], &[0xef, 0x01, 0x00], "not delegated: {code}");

    let wallets = Wallets { factory, rogue_factory, wallet, owner, counterfactual_owner: Payer::random(), delegated };
    let token = X402TestToken::new(TOKEN, &s.wallet);
    for holder in [
        wallet,
        delegated_address(&wallets),
        counterfactual(&s.wallet, &wallets, 1).await,
        counterfactual(&s.wallet, &wallets, 2).await,
    ] {
        token.mint(holder, U256::from(1_000_000u64)).send().await.unwrap().get_receipt().await.unwrap();
    }
    wallets
}

/// `account` delegates to `code` (EIP-7702): a real type-4 transaction,
/// sent by the deployer, carrying the account's signed authorization.
async fn delegate_to(s: &Setup, account: &Payer, code: Address) {
    let nonce = s.wallet.get_transaction_count(account.address()).await.unwrap();
    let delegation = Delegation { chain_id: U256::from(31337), address: code, nonce };
    let signature = account.signer().sign_hash_sync(&delegation.signature_hash()).unwrap();
    // (To a plain account: the delegated one may run code that takes no
    // empty call.)
    let tx = TransactionRequest::default()
        .with_to(Address::repeat_byte(0x5e))
        .with_authorization_list(vec![delegation.into_signed(signature)]);
    let receipt = s.wallet.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();
    assert!(receipt.status(), "the delegation was refused");
}

fn delegated_address(w: &Wallets) -> Address {
    w.delegated.address()
}

/// The address of `w`'s counterfactual wallet number `salt`.
async fn counterfactual(provider: &impl Provider, w: &Wallets, salt: u8) -> Address {
    X402TestWalletFactory::new(w.factory, provider)
        .walletAddress(w.counterfactual_owner.address(), B256::with_last_byte(salt))
        .call()
        .await
        .unwrap()
}

/// A payment of [`AMOUNT`] to `pay_to` from `from`, signed by `key`.
fn pay(key: &Payer, from: Address, pay_to: Address) -> (Requirements, ExactPayload) {
    let req = requirements(pay_to);
    let payload = key.sign_exact_from(from, &req, now() - 600, now() + 3600, random_nonce());
    (req, payload)
}

/// `payload` with its signature wrapped for `factory` deploying
/// `owner`'s wallet number `salt` (ERC-6492).
fn wrapped(mut payload: ExactPayload, factory: Address, owner: Address, salt: u8) -> ExactPayload {
    let calldata = X402TestWalletFactory::createWalletCall { owner, salt: B256::with_last_byte(salt) }.abi_encode();
    let wrapper = Erc6492 { factory, calldata: calldata.into(), signature: Bytes::from(payload.signature) };
    payload.signature = wrapper.wrap().to_vec();
    payload
}

async fn submit(client: &mut Payments, req: &Requirements, payload: &ExactPayload) -> pb::SubmitResponse {
    client.submit(exact_submit(1, req, payload)).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payers_with_code_are_proved_on_chain_and_settle_direct_and_batched() {
    let s = Setup::new(1).await;
    let w = deploy_wallets(&s).await;
    let (c1, c2) = (counterfactual(&s.wallet, &w, 1).await, counterfactual(&s.wallet, &w, 2).await);
    assert!(s.wallet.get_code_at(c1).await.unwrap().is_empty(), "counterfactual wallets are not deployed yet");
    let dir = tempfile::tempdir().unwrap();
    let factory = w.factory;
    let config = s.node_config(dir.path(), Setup::merchant(3600), |c| c.erc6492_factories = vec![factory]);
    let node = start_node(&config).await;
    let (grpc, http) = (node.endpoints().grpc, node.endpoints().http);
    let (mut m1, mut m2) = (payments(grpc, M1_KEY).await, payments(grpc, M2_KEY).await);

    // Forged signatures first, while every wallet is as the test made it.
    let stranger = Payer::random();
    let forged = [
        ("an ERC-1271 wallet", pay(&stranger, w.wallet, PAY_TO)),
        ("a 7702-delegated EOA", pay(&stranger, w.delegated.address(), PAY_TO)),
        ("a counterfactual wallet", {
            let (req, payload) = pay(&stranger, c1, PAY_TO);
            (req, wrapped(payload, w.factory, w.counterfactual_owner.address(), 1))
        }),
    ];
    for (who, (req, payload)) in &forged {
        let answer = submit(&mut m1, req, payload).await;
        assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a forged signature from {who} was accepted");
        assert_eq!(answer.reason, "invalid_exact_evm_signature", "{who}: {}", answer.message);
    }
    // The owner's signature, wrapped for a factory not on the allowlist.
    let (req, payload) = pay(&w.counterfactual_owner, c1, PAY_TO);
    let rogue = wrapped(payload, w.rogue_factory, w.counterfactual_owner.address(), 1);
    let answer = submit(&mut m1, &req, &rogue).await;
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a factory off the allowlist was accepted");
    assert_eq!(answer.reason, "invalid_exact_evm_signature");
    assert!(answer.message.contains("allowlist"), "{}", answer.message);
    // Refused before settlement: nothing deployed.
    assert!(s.wallet.get_code_at(c1).await.unwrap().is_empty());

    // Genuine payments from each, direct (m1) and batched (m2).
    let mut accepted = Vec::new();
    for (key, client, pay_to) in [(M1_KEY, &mut m1, PAY_TO), (M2_KEY, &mut m2, PAY_TO_2)] {
        let salt = if key == M1_KEY { 1 } else { 2 };
        let cf = if salt == 1 { c1 } else { c2 };
        let payments = [
            ("ERC-1271", pay(&w.owner, w.wallet, pay_to)),
            ("EIP-7702", pay(&w.delegated, w.delegated.address(), pay_to)),
            ("ERC-6492", {
                let (req, payload) = pay(&w.counterfactual_owner, cf, pay_to);
                (req, wrapped(payload, w.factory, w.counterfactual_owner.address(), salt))
            }),
        ];
        for (kind, (req, payload)) in payments {
            let answer = submit(client, &req, &payload).await;
            assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{kind} to {key}: {}", answer.message);
            // The same payment again is the same payment, not a second one.
            let again = submit(client, &req, &payload).await;
            assert_eq!(outcome(&again), pb::Outcome::Duplicate, "{kind} replayed: {}", again.message);
            accepted.push((kind, key, B256::from_slice(&answer.payment_id)));
        }
    }

    for (kind, key, id) in &accepted {
        let answer = state_becomes(http, key, *id, "confirmed").await;
        let (status, _) = get(http, Some(key), &format!("/settlements/{id}")).await;
        assert_eq!(status, 200, "{kind}");
        assert!(answer["transaction"].is_string(), "{kind}: {answer}");
    }
    // Both counterfactual wallets were deployed by their settlements.
    for cf in [c1, c2] {
        assert!(!s.wallet.get_code_at(cf).await.unwrap().is_empty(), "{cf} was not deployed");
    }
    let token = X402TestToken::new(TOKEN, &s.wallet);
    for (holder, paid) in [(w.wallet, 2u64), (w.delegated.address(), 2), (c1, 1), (c2, 1)] {
        let balance = token.balanceOf(holder).call().await.unwrap();
        assert_eq!(balance, U256::from(1_000_000 - paid * AMOUNT), "{holder}");
    }
    assert_eq!(token.balanceOf(PAY_TO).call().await.unwrap(), U256::from(3 * AMOUNT));
    assert_eq!(token.balanceOf(PAY_TO_2).call().await.unwrap(), U256::from(3 * AMOUNT));
}

/// Proofs on a real chain: a hundred requests take one `eth_call`, and a
/// hostile wallet that burns all the gas it is given uses up its own
/// allowance only: it is refused, and every honest check in its call is
/// valid; a wallet one check deploys is gone for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_proofs_take_one_call_and_a_gas_burner_starves_no_one() {
    use std::{sync::Arc, sync::atomic::Ordering};
    use x402_engine::signature::{
        ChainSignatures, ChainSignaturesConfig, Check, Proof, ProofNotifier, SignatureRequest, SignatureSource,
    };

    let s = Setup::new(0).await;
    let owner = Payer::random();
    let wallet = *X402TestWallet::deploy(&s.wallet, owner.address()).await.unwrap().address();
    let burner = *x402_chain::contracts::X402TestGasBurner::deploy(&s.wallet).await.unwrap().address();
    let factory = *X402TestWalletFactory::deploy(&s.wallet).await.unwrap().address();
    let chain =
        x402_chain::AlloyChain::connect(s.anvil.endpoint(), Vec::new(), x402_chain::TxConfig::default()).await.unwrap();
    let config = ChainSignaturesConfig { window: std::time::Duration::from_millis(50), ..Default::default() };
    let signatures = ChainSignatures::new(Arc::new(chain), config);

    let request = |signer: Address, key: &Payer| {
        let digest = random_nonce();
        let signature = key.signer().sign_hash_sync(&digest).unwrap().as_bytes().to_vec();
        SignatureRequest { signer, check: Check::Erc1271 { digest, signature: signature.into() }, deploy: None }
    };
    let prove_all = |requests: Vec<SignatureRequest>| {
        let receivers: Vec<_> = requests
            .into_iter()
            .map(|r| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                signatures.prove(31337, r, ProofNotifier::new(move |p| drop(tx.send(p))));
                rx
            })
            .collect();
        async move {
            let mut proofs = Vec::new();
            for rx in receivers {
                proofs.push(rx.await.unwrap().unwrap());
            }
            proofs
        }
    };

    let proofs = prove_all((0..100).map(|_| request(wallet, &owner)).collect()).await;
    assert!(proofs.iter().all(|p| *p == Proof::Valid), "{proofs:?}");
    assert_eq!(signatures.stats().calls.load(Ordering::Relaxed), 1, "a hundred proofs took more than one call");

    // 30 checks: two burners among them, a forgery, and a counterfactual
    // wallet whose deployment by one check must not serve the next, which
    // names it without deploying it.
    let cf_owner = Payer::random();
    let cf = X402TestWalletFactory::new(factory, &s.wallet)
        .walletAddress(cf_owner.address(), B256::ZERO)
        .call()
        .await
        .unwrap();
    let deploy = Erc6492 {
        factory,
        calldata: X402TestWalletFactory::createWalletCall { owner: cf_owner.address(), salt: B256::ZERO }
            .abi_encode()
            .into(),
        signature: Bytes::new(),
    };
    let mut requests: Vec<_> = (0..30).map(|_| request(wallet, &owner)).collect();
    requests[3] = request(burner, &owner);
    requests[17] = request(burner, &owner);
    requests[25] = request(wallet, &Payer::random());
    requests[26] = SignatureRequest { deploy: Some(deploy), ..request(cf, &cf_owner) };
    requests[27] = request(cf, &cf_owner);
    let before = signatures.stats().calls.load(Ordering::Relaxed);
    let proofs = prove_all(requests).await;
    for (i, proof) in proofs.iter().enumerate() {
        match i {
            // Starved by its own allowance: its call fails (with 1/64 of
            // the allowance left to say so), or the check runs out.
            3 | 17 => assert!(
                matches!(proof, Proof::Refused(_, m) if m.contains("reverted") || m.contains("gas")),
                "{i}: {proof:?}"
            ),
            25 => assert!(matches!(proof, Proof::Refused(_, m) if m.contains("magic")), "{i}: {proof:?}"),
            27 => assert!(matches!(proof, Proof::Refused(_, m) if m.contains("no code")), "{i}: {proof:?}"),
            _ => assert_eq!(*proof, Proof::Valid, "check {i}"),
        }
    }
    let calls = signatures.stats().calls.load(Ordering::Relaxed) - before;
    assert_eq!(calls, 1, "two burners in 30 checks took {calls} calls");
}

/// A channel whose `payerAuthorizer` is an ERC-1271 wallet: its vouchers,
/// signed by the wallet's owner, are proved on chain and claimed (the
/// contract asks the wallet, as x402d did); a stranger's voucher for it is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vouchers_of_a_contract_payer_authorizer_are_proved_and_claimed() {
    use x402_chain::contracts::BATCH_SETTLEMENT_ADDRESS;
    use x402_engine::config::PolicyConfig;

    use crate::channels::{MC_KEY, PRICE, config_json, eventually, payload_json, priced_voucher, requirements_json};

    let s = Setup::new(1).await;
    let owner = Payer::random();
    let authorizer = *X402TestWallet::deploy(&s.wallet, owner.address()).await.unwrap().address();
    let e = s.engine_with(PolicyConfig::Channel { claim_interval_secs: 3600, claim_threshold: "30".into() }).await;
    let payer = &s.payers[0];
    let mut config = s.config(payer);
    config.payerAuthorizer = authorizer;
    s.deposit_into(payer, config.clone(), 1_000).await;
    let id = x402_channel::ChannelDomain::new(31337, BATCH_SETTLEMENT_ADDRESS).channel_id(&config);
    // The request after `n` paid ones, its voucher signed by `by`.
    let voucher = |n: u64, by: &Payer| priced_voucher(n, by, &config, PRICE * u128::from(n as u8), PRICE);
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;

    // Neither the payer's own key nor a stranger's signs for the wallet.
    for forger in [payer, &Payer::random()] {
        let answer = client.submit(voucher(0, forger)).await.unwrap().into_inner();
        assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a forged voucher was accepted");
        assert_eq!(answer.reason, "invalid_batch_settlement_evm_voucher_signature", "{}", answer.message);
    }
    for n in 0..3 {
        let answer = client.submit(voucher(n, &owner)).await.unwrap().into_inner();
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "voucher {n}: {}", answer.message);
    }
    // 30 charged reaches the threshold: claimed on chain.
    let bsc = x402_chain::contracts::X402BatchSettlement::new(BATCH_SETTLEMENT_ADDRESS, &s.wallet);
    eventually(30, "the claim of the wallet-authorized channel", || async {
        bsc.channels(id).call().await.unwrap().totalClaimed == 3 * PRICE
    })
    .await;

    // The reference server's way, over HTTP, on another channel of the
    // wallet's: the voucher verifies (proved on chain) and the server's
    // claim of it goes through with its signature as it is.
    let mut other = s.salted_config(payer, B256::repeat_byte(1));
    other.payerAuthorizer = authorizer;
    s.deposit_into(payer, other.clone(), 1_000).await;
    let http = reqwest::Client::new();
    let post = |path: &str, payload: serde_json::Value, amount: u128| {
        let body = serde_json::json!({
            "x402Version": 2, "paymentPayload": payload, "paymentRequirements": requirements_json(&other, amount),
        });
        let request = http.post(format!("http://{}{path}", e.node.endpoints().http)).bearer_auth(MC_KEY).json(&body);
        async move { request.send().await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    let verified = post("/verify", payload_json(&owner, &other, PRICE, None), PRICE).await;
    assert_eq!(verified["isValid"], true, "{verified}");
    let forged = post("/verify", payload_json(payer, &other, PRICE, None), PRICE).await;
    assert_eq!(forged["invalidReason"], "invalid_batch_settlement_evm_voucher_signature", "{forged}");
    let domain = x402_channel::ChannelDomain::new(31337, BATCH_SETTLEMENT_ADDRESS);
    let other_id = domain.channel_id(&other);
    let claim = serde_json::json!({
        "x402Version": 2,
        "accepted": requirements_json(&other, 0),
        "payload": { "type": "claim", "claims": [{
            "voucher": { "channel": config_json(&other), "maxClaimableAmount": PRICE.to_string() },
            "signature": owner.sign_voucher(&domain, other_id, PRICE).to_string(),
            "totalClaimed": PRICE.to_string(),
        }]},
    });
    let claimed = post("/settle", claim, 0).await;
    assert_eq!(claimed["success"], true, "{claimed}");
    assert_eq!(bsc.channels(other_id).call().await.unwrap().totalClaimed, PRICE);
}

/// A payer delegated by EIP-7702 signs its own channel's vouchers: they
/// recover locally, but the contract asks its delegate (ERC-1271), so x402d
/// proves them on chain as it does a contract's, and claims them; once its
/// delegate is one that approves nothing, its vouchers are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vouchers_of_a_delegated_payer_are_proved_and_claimed() {
    use x402_chain::contracts::BATCH_SETTLEMENT_ADDRESS;
    use x402_engine::config::PolicyConfig;

    use crate::channels::{MC_KEY, PRICE, eventually, payload_json, priced_voucher, requirements_json};

    let s = Setup::new(2).await;
    let delegate = *X402TestDelegate::deploy(&s.wallet).await.unwrap().address();
    let e = s.engine_with(PolicyConfig::Channel { claim_interval_secs: 3600, claim_threshold: "30".into() }).await;
    let mut client = payments(e.node.endpoints().grpc, MC_KEY).await;
    let (payer, refuser) = (&s.payers[0], &s.payers[1]);
    // Their channels over gRPC, and others of theirs over HTTP.
    let over_http = |p: &Payer| s.salted_config(p, B256::repeat_byte(1));
    for p in [payer, refuser] {
        s.deposit(p, 1_000).await;
        s.deposit_into(p, over_http(p), 1_000).await;
    }
    delegate_to(&s, payer, delegate).await;
    // Delegated to an account with no code: its code approves nothing.
    delegate_to(&s, refuser, Address::repeat_byte(0x77)).await;
    let config = s.config(payer);
    let voucher = |n: u64, by: &Payer| priced_voucher(n, by, &config, PRICE * u128::from(n as u8), PRICE);

    let answer = client.submit(voucher(0, &Payer::random())).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a stranger's voucher was accepted");
    assert_eq!(answer.reason, "invalid_batch_settlement_evm_voucher_signature", "{}", answer.message);
    for n in 0..3 {
        let answer = client.submit(voucher(n, payer)).await.unwrap().into_inner();
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "voucher {n}: {}", answer.message);
    }
    let refused = priced_voucher(9, refuser, &s.config(refuser), 0, PRICE);
    let answer = client.submit(refused).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Rejected, "a voucher its signer's code refuses was accepted");
    assert!(answer.message.contains("isValidSignature"), "{}", answer.message);

    // 30 charged reaches the threshold: claimed, the contract asking the delegate.
    let id = x402_channel::ChannelDomain::new(31337, BATCH_SETTLEMENT_ADDRESS).channel_id(&config);
    let bsc = x402_chain::contracts::X402BatchSettlement::new(BATCH_SETTLEMENT_ADDRESS, &s.wallet);
    eventually(30, "the claim of the delegated payer's channel", || async {
        bsc.channels(id).call().await.unwrap().totalClaimed == 3 * PRICE
    })
    .await;

    // The facilitator API asks their code too.
    let http = reqwest::Client::new();
    for (p, valid) in [(payer, true), (refuser, false)] {
        let config = over_http(p);
        let body = serde_json::json!({
            "x402Version": 2,
            "paymentPayload": payload_json(p, &config, PRICE, None),
            "paymentRequirements": requirements_json(&config, PRICE),
        });
        let url = format!("http://{}/verify", e.node.endpoints().http);
        let response = http.post(url).bearer_auth(MC_KEY).json(&body).send().await.unwrap();
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["isValid"], valid, "{answer}");
        if !valid {
            assert_eq!(answer["invalidReason"], "invalid_batch_settlement_evm_voucher_signature", "{answer}");
        }
    }
}

/// A stream of payments in which one in ten comes from one of ten contract
/// wallets (a hundred each): every one is accepted, in a handful of proof
/// calls, however the wallets' payments queue behind each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_contract_wallets_is_accepted_in_few_proof_calls() {
    let s = Setup::new(90).await;
    let token = X402TestToken::new(TOKEN, &s.wallet);
    let mut wallets = Vec::new();
    for _ in 0..10 {
        let owner = Payer::random();
        let wallet = *X402TestWallet::deploy(&s.wallet, owner.address()).await.unwrap().address();
        token.mint(wallet, U256::from(10u64.pow(12))).send().await.unwrap().get_receipt().await.unwrap();
        wallets.push((owner, wallet));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = s.node_config(dir.path(), Setup::merchant(3600), |c| c.balance_ttl_secs = 3600);
    let node = start_node(&config).await;
    let mut m2 = payments(node.endpoints().grpc, M2_KEY).await;
    let requests: Vec<_> = (0..1000)
        .map(|i| {
            let (key, from) = match i % 10 {
                9 => (&wallets[i / 10 % 10].0, wallets[i / 10 % 10].1),
                _ => (&s.payers[i % 90], s.payers[i % 90].address()),
            };
            let (req, payload) = pay(key, from, PAY_TO_2);
            exact_submit(i as u64, &req, &payload)
        })
        .collect();
    let started = std::time::Instant::now();
    let answers = stream_all(&mut m2, requests).await;
    let refused: Vec<_> = answers.iter().filter(|a| outcome(a) != pb::Outcome::Accepted).collect();
    assert!(refused.is_empty(), "{} refused, the first: {:?}", refused.len(), refused.first());
    eprintln!("1000 payments, 100 from contract wallets, in {:?}", started.elapsed());
}

/// An EOA pays a batched merchant with its own key, then delegates (EIP-7702)
/// to a contract that approves in simulations and burns all its gas in paid
/// transactions. In a batch, the token's check of it would starve every row
/// after it, batch after batch, until they expired. Its rows leave the batch
/// and settle alone (and fail, its gas burnt once), and the honest rows of
/// the batch settle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eoa_delegated_after_paying_cannot_starve_its_batch() {
    use x402_engine::config::PolicyConfig;
    let s = Setup::new(3).await;
    let burner = *x402_chain::contracts::X402TestPricedBurner::deploy(&s.wallet).await.unwrap().address();
    let dir = tempfile::tempdir().unwrap();
    let mut config = s.node_config(dir.path(), Setup::merchant(3600), |_| {});
    // Time to delegate before the batch goes out.
    config.merchants[1].policy = PolicyConfig::Batched { max_rows: 100, max_wait_ms: 5_000 };
    let node = start_node(&config).await;
    let (grpc, http) = (node.endpoints().grpc, node.endpoints().http);
    let mut m2 = payments(grpc, M2_KEY).await;

    // The attacker's payment has the earliest deadline: first in its batch.
    let (attacker, honest) = (&s.payers[2], &s.payers[..2]);
    let req = requirements(PAY_TO_2);
    let payload = attacker.sign_exact(&req, now() - 600, now() + 90, random_nonce());
    let answer = m2.submit(exact_submit(1, &req, &payload)).await.unwrap().into_inner();
    assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    let attacked = B256::from_slice(&answer.payment_id);
    for (n, payer) in honest.iter().enumerate() {
        let (req, payload) = pay(payer, payer.address(), PAY_TO_2);
        let answer = m2.submit(exact_submit(2 + n as u64, &req, &payload)).await.unwrap().into_inner();
        assert_eq!(outcome(&answer), pb::Outcome::Accepted, "{}", answer.message);
    }

    // Now it delegates to the burner.
    delegate_to(&s, attacker, burner).await;

    // The honest payments settle; the attacker's fails on its own.
    let token = X402TestToken::new(TOKEN, &s.wallet);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while token.balanceOf(PAY_TO_2).call().await.unwrap() != U256::from(2 * AMOUNT) {
        assert!(tokio::time::Instant::now() < deadline, "the honest payments of the batch never settled");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let answer = state_becomes(http, M2_KEY, attacked, "failed").await;
    assert!(answer["transaction"].is_string(), "settled alone, in its own transaction: {answer}");
}
