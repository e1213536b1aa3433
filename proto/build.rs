//! Compiles `x402/engine/v1/*.proto` with `protox` (pure Rust, no system
//! `protoc`) and generates the tonic services from the descriptor set. The
//! encoded descriptor set is kept for gRPC server reflection.

use std::{env, path::PathBuf};

use protox::prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["x402/engine/v1/engine.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("x402_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The voucher is the largest payment by far: boxed, a SubmitRequest
        // stays small for the common `exact` case.
        .boxed(".x402.engine.v1.SubmitRequest.payment.voucher")
        .compile_fds(fds)?;
    Ok(())
}
