//! A ready-to-use local chain: the test token at its well-known address,
//! Multicall3 at its canonical address, and funded test payers. Used by
//! `x402d dev` and by tests.

use alloy::{
    network::EthereumWallet,
    primitives::{Address, Bytes, U256},
    providers::{Provider, ProviderBuilder, ext::AnvilApi},
    signers::local::PrivateKeySigner,
};

use x402_chain::contracts::{
    BATCH_SETTLEMENT_ADDRESS, ERC3009_DEPOSIT_COLLECTOR_ADDRESS, ERC3009DepositCollector, MULTICALL3_ADDRESS,
    Multicall3, X402BatchSettlement, X402TestToken,
};

use crate::Result;

/// Anvil's funded development account 0; it deploys, so the token lands at
/// [`DEV_TOKEN_ADDRESS`]. A public test key: never use it on a real chain.
pub const DEV_DEPLOYER_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
/// Where the first contract deployed by anvil's account 0 lands.
pub const DEV_TOKEN_ADDRESS: Address = alloy::primitives::address!("0x5FbDB2315678afecb367f032d93F642f64180aa3");
/// The token's EIP-712 name (that of USDC).
pub const DEV_TOKEN_NAME: &str = "USD Coin";
/// The token's EIP-712 version (that of USDC).
pub const DEV_TOKEN_VERSION: &str = "2";

/// What [`deploy`] set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Devnet {
    /// The chain id (anvil's 31337).
    pub chain_id: u64,
    /// The EIP-3009 test token ([`DEV_TOKEN_ADDRESS`]).
    pub token: Address,
    /// Multicall3, at its canonical address.
    pub multicall: Address,
    /// The `batch-settlement` channel contract.
    pub channels: Address,
    /// Its ERC-3009 deposit collector.
    pub deposit_collector: Address,
}

/// Deploys the test token with [`DEV_DEPLOYER_KEY`], puts Multicall3's code
/// at its canonical address and the channel contract and its deposit
/// collector at the public `batch-settlement` addresses, and mints `amount` to each of `payers`, on the
/// anvil node at `endpoint`.
pub async fn deploy(endpoint: &str, payers: &[Address], amount: U256) -> Result<Devnet> {
    let deployer: PrivateKeySigner = DEV_DEPLOYER_KEY.parse().expect("a valid key");
    let url = endpoint.parse().map_err(|e| crate::Error::Anvil(format!("bad endpoint {endpoint}: {e}")))?;
    let provider = ProviderBuilder::new().wallet(EthereumWallet::from(deployer)).connect_http(url);
    let chain_id = provider.get_chain_id().await?;

    let token = X402TestToken::deploy(&provider, DEV_TOKEN_NAME.into(), DEV_TOKEN_VERSION.into()).await?;
    for payer in payers {
        token.mint(*payer, amount).send().await?.get_receipt().await?;
    }
    provider.anvil_set_code(MULTICALL3_ADDRESS, Multicall3::DEPLOYED_BYTECODE.clone()).await?;
    install_channels(&provider).await?;
    Ok(Devnet {
        chain_id,
        token: *token.address(),
        multicall: MULTICALL3_ADDRESS,
        channels: BATCH_SETTLEMENT_ADDRESS,
        deposit_collector: ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    })
}

/// Puts the channel contract at [`BATCH_SETTLEMENT_ADDRESS`] and a deposit
/// collector bound to it at [`ERC3009_DEPOSIT_COLLECTOR_ADDRESS`]. The
/// collector's runtime code embeds the channel contract's address (an
/// immutable), so it is deployed once with that address and its code copied.
async fn install_channels<P: Provider>(provider: &P) -> Result<()> {
    provider.anvil_set_code(BATCH_SETTLEMENT_ADDRESS, X402BatchSettlement::DEPLOYED_BYTECODE.clone()).await?;
    let collector = ERC3009DepositCollector::deploy(provider, BATCH_SETTLEMENT_ADDRESS).await?;
    let code = provider.get_code_at(*collector.address()).await?;
    provider.anvil_set_code(ERC3009_DEPOSIT_COLLECTOR_ADDRESS, code).await?;
    Ok(())
}

/// Switches anvil from a block per transaction to a block every `secs`.
pub async fn set_interval_mining(endpoint: &str, secs: u64) -> Result<()> {
    let url = endpoint.parse().map_err(|e| crate::Error::Anvil(format!("bad endpoint {endpoint}: {e}")))?;
    let provider = ProviderBuilder::new().connect_http(url);
    provider.anvil_set_auto_mine(false).await?;
    provider.anvil_set_interval_mining(secs).await?;
    Ok(())
}

/// Gives each of `accounts` 100 ether (for settlement signers).
pub async fn fund_ether(endpoint: &str, accounts: &[Address]) -> Result<()> {
    let url = endpoint.parse().map_err(|e| crate::Error::Anvil(format!("bad endpoint {endpoint}: {e}")))?;
    let provider = ProviderBuilder::new().connect_http(url);
    for account in accounts {
        provider.anvil_set_balance(*account, U256::from(10u128.pow(20))).await?;
    }
    Ok(())
}

/// The code at `address`, to check a deployment.
pub async fn code_at(endpoint: &str, address: Address) -> Result<Bytes> {
    let url = endpoint.parse().map_err(|e| crate::Error::Anvil(format!("bad endpoint {endpoint}: {e}")))?;
    Ok(ProviderBuilder::new().connect_http(url).get_code_at(address).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anvil::Anvil;

    #[tokio::test]
    async fn deploys_token_multicall_and_funds_payers() {
        let anvil = Anvil::spawn(&[]).unwrap();
        let payers = [Address::repeat_byte(1), Address::repeat_byte(2)];
        let devnet = deploy(anvil.endpoint(), &payers, U256::from(5_000_000)).await.unwrap();
        assert_eq!(
            devnet,
            Devnet {
                chain_id: 31337,
                token: DEV_TOKEN_ADDRESS,
                multicall: MULTICALL3_ADDRESS,
                channels: BATCH_SETTLEMENT_ADDRESS,
                deposit_collector: ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
            }
        );

        let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
        let token = X402TestToken::new(devnet.token, &provider);
        for payer in payers {
            assert_eq!(token.balanceOf(payer).call().await.unwrap(), U256::from(5_000_000));
        }
        assert_eq!(token.name().call().await.unwrap(), DEV_TOKEN_NAME);
        let multicall = Multicall3::new(devnet.multicall, &provider);
        assert_eq!(multicall.getChainId().call().await.unwrap(), U256::from(31337));
        assert!(!code_at(anvil.endpoint(), devnet.multicall).await.unwrap().is_empty());
        let channels = X402BatchSettlement::new(devnet.channels, &provider);
        assert_eq!(channels.MIN_WITHDRAW_DELAY().call().await.unwrap(), alloy::primitives::aliases::U40::from(900));
        let collector = ERC3009DepositCollector::new(devnet.deposit_collector, &provider);
        assert_eq!(collector.settlement().call().await.unwrap(), devnet.channels);
    }
}
