#!/usr/bin/env node
// Compiles every chain/contracts/src/*.sol with the pinned solc-js (offline)
// and writes chain/contracts/out/<ContractName>.json artifacts.
//
//   node chain/contracts/compile.js           compile and (re)write artifacts
//   node chain/contracts/compile.js --check   compile in memory; exit 1 if any
//                                             artifact is stale, missing or extra
//
// Artifacts are deterministic: same sources + same solc => byte-identical files.
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const ROOT = __dirname;
const SRC_DIR = path.join(ROOT, 'src');
const OUT_DIR = path.join(ROOT, 'out');
const EVM_VERSION = 'cancun';
const OPTIMIZER_RUNS = 200;

function rel(p) {
  return path.relative(process.cwd(), p) || '.';
}

function usage(code) {
  (code === 0 ? console.log : console.error)('usage: node chain/contracts/compile.js [--check]');
  process.exit(code);
}

function listSources() {
  return fs
    .readdirSync(SRC_DIR, { withFileTypes: true })
    .filter((d) => d.isFile() && d.name.endsWith('.sol'))
    .map((d) => d.name)
    .sort();
}

// Resolves imports (source unit names are paths relative to src/).
function findImports(unitName) {
  const file = path.resolve(SRC_DIR, unitName);
  if (!file.startsWith(SRC_DIR + path.sep)) {
    return { error: `import outside chain/contracts/src: ${unitName}` };
  }
  try {
    return { contents: fs.readFileSync(file, 'utf8') };
  } catch (e) {
    return { error: `cannot read ${unitName}: ${e.message}` };
  }
}

function compile() {
  const files = listSources();
  if (files.length === 0) {
    throw new Error(`no .sol files in ${rel(SRC_DIR)}`);
  }

  const raw = new Map(); // unit name -> Buffer (exact bytes)
  const sources = {};
  for (const f of files) {
    const bytes = fs.readFileSync(path.join(SRC_DIR, f));
    raw.set(f, bytes);
    sources[f] = { content: bytes.toString('utf8') };
  }

  const input = {
    language: 'Solidity',
    sources,
    settings: {
      optimizer: { enabled: true, runs: OPTIMIZER_RUNS },
      evmVersion: EVM_VERSION,
      outputSelection: {
        '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] },
      },
    },
  };

  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));

  let failed = false;
  for (const e of output.errors || []) {
    const msg = (e.formattedMessage || e.message).trimEnd();
    if (e.severity === 'error') {
      failed = true;
      console.error(msg);
    } else {
      console.warn(msg);
    }
  }
  if (failed) {
    throw new Error('compilation failed');
  }

  const version = solc.version();
  const artifacts = new Map(); // file name -> contents
  for (const unit of Object.keys(output.contracts || {}).sort()) {
    if (!raw.has(unit)) continue; // imported from elsewhere: not ours
    const sourceHash = crypto.createHash('sha256').update(raw.get(unit)).digest('hex');
    for (const name of Object.keys(output.contracts[unit]).sort()) {
      const c = output.contracts[unit][name];
      const bytecode = c.evm.bytecode.object;
      if (!bytecode) continue; // interface / abstract contract
      const fileName = `${name}.json`;
      if (artifacts.has(fileName)) {
        throw new Error(`duplicate contract name ${name} (in ${unit})`);
      }
      const artifact = {
        contractName: name,
        abi: c.abi,
        bytecode: '0x' + bytecode,
        deployedBytecode: '0x' + c.evm.deployedBytecode.object,
        sourceHash,
        solcVersion: version,
      };
      artifacts.set(fileName, JSON.stringify(artifact, null, 2) + '\n');
    }
  }
  return artifacts;
}

function existingArtifacts() {
  if (!fs.existsSync(OUT_DIR)) return [];
  return fs
    .readdirSync(OUT_DIR)
    .filter((f) => f.endsWith('.json'))
    .sort();
}

function main() {
  const args = process.argv.slice(2);
  if (args.includes('-h') || args.includes('--help')) usage(0);
  const unknown = args.filter((a) => a !== '--check');
  if (unknown.length) {
    console.error(`unknown argument(s): ${unknown.join(' ')}`);
    usage(2);
  }
  const check = args.includes('--check');

  const artifacts = compile();
  const present = existingArtifacts();

  if (check) {
    const problems = [];
    for (const [f, contents] of artifacts) {
      const p = path.join(OUT_DIR, f);
      if (!fs.existsSync(p)) {
        problems.push(`missing: ${rel(p)}`);
      } else if (!fs.readFileSync(p).equals(Buffer.from(contents, 'utf8'))) {
        problems.push(`stale:   ${rel(p)}`);
      }
    }
    for (const f of present) {
      if (!artifacts.has(f)) problems.push(`extra:   ${rel(path.join(OUT_DIR, f))}`);
    }
    if (problems.length) {
      for (const p of problems) console.error(p);
      console.error('contract artifacts are out of date; run `npm run compile-contracts`');
      process.exit(1);
    }
    console.log(`ok: ${artifacts.size} artifact(s) in ${rel(OUT_DIR)} are up to date (solc ${solc.version()})`);
    return;
  }

  fs.mkdirSync(OUT_DIR, { recursive: true });
  for (const f of present) {
    if (!artifacts.has(f)) {
      fs.unlinkSync(path.join(OUT_DIR, f));
      console.log(`removed stale ${rel(path.join(OUT_DIR, f))}`);
    }
  }
  for (const [f, contents] of artifacts) {
    const p = path.join(OUT_DIR, f);
    const old = fs.existsSync(p) ? fs.readFileSync(p, 'utf8') : null;
    if (old === contents) {
      console.log(`unchanged ${rel(p)}`);
    } else {
      fs.writeFileSync(p, contents);
      console.log(`wrote     ${rel(p)}`);
    }
  }
}

try {
  main();
} catch (e) {
  console.error(`error: ${e.message}`);
  process.exit(1);
}
