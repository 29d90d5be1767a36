//! `palisade validate FILE...` offline: every problem of the batch in one run, sorted by file
//! and line, each with its field and reason; warnings beside errors. Errors fail the command
//! (exit 1); warnings never do. A batch without errors is also compiled, as ztunnel would.
use std::path::PathBuf;

use palisade_model::validate;

/// Prints the findings (standard error, like a compiler's diagnostics) and a summary; returns
/// whether the batch is valid.
pub fn run(paths: &[PathBuf], trust_domain: &str) -> anyhow::Result<bool> {
    let batch = palisade_model::load::load_batch(paths)?;
    let findings = validate::check_batch(&batch);
    for f in &findings {
        eprintln!("{f}");
    }
    let errors = findings.iter().filter(|f| f.is_error()).count();
    let warnings = findings.len() - errors;
    if errors > 0 {
        eprintln!("invalid: {}, {}", plural(errors, "error"), plural(warnings, "warning"));
        return Ok(false);
    }
    let s = palisade_model::compile::compile_for(&batch.resources, trust_domain);
    println!(
        "ok: {} workloads, {} identities, {} rules, {} policy cells, {}",
        s.workloads.len(),
        s.identities.len(),
        s.rules.len(),
        s.cells.len(),
        plural(warnings, "warning")
    );
    // What the kernel keeps coarser than the exact evaluation (not a problem of the input).
    for a in &s.approximations {
        println!("note: {a}");
    }
    Ok(true)
}

fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}
