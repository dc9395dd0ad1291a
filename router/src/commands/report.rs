//! `cascade report`: spend by team and experiment results from the ledger, as tables (or the
//! admin API's JSON), for operators without an HTTP client at hand.

use std::io::Write as _;

use anyhow::Context as _;

use crate::accounts;
use crate::cli::ReportArgs;
use crate::config::Config;
use crate::reporting::table;

/// Reads the ledger named by the configuration and prints the report.
pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let text = runtime.block_on(report(&config, args))?;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

/// The report as text: the spend table of the window, then one table per experiment.
pub async fn report(config: &Config, args: &ReportArgs) -> anyhow::Result<String> {
    let storage = crate::storage::connect(&config.storage)
        .await
        .with_context(|| format!("cannot open the ledger at {}", config.storage.url))?;
    let window = match args.window.as_str() {
        "day" => policies::Window::Day,
        "month" => policies::Window::Month,
        other => anyhow::bail!("--window must be day or month, not `{other}`"),
    };
    let now = crate::clock::now_unix_ms();
    let spend = accounts::spend(&storage, &config.policies, window, now).await?;
    let ids: Vec<String> = match &args.experiment {
        Some(id) => vec![id.clone()],
        None => config
            .policies
            .experiments()
            .iter()
            .map(|e| e.id().to_string())
            .collect(),
    };
    let mut experiments = Vec::new();
    for id in &ids {
        match accounts::experiment(&storage, &config.policies, id).await? {
            Some(report) => experiments.push(report),
            None => anyhow::bail!("no experiment `{id}` in the configuration or the ledger"),
        }
    }
    storage.close().await;
    if args.json {
        let value = serde_json::json!({"spend": spend, "experiments": experiments});
        return Ok(format!("{}\n", serde_json::to_string_pretty(&value)?));
    }
    let mut out = format!(
        "Spend by team, this {} ({}):\n{}",
        spend.window,
        spend.timezone,
        table::spend_table(&spend.teams)
    );
    for e in &experiments {
        out.push_str(&format!(
            "\nExperiment {}{} (95% confidence intervals):\n{}",
            e.experiment,
            e.team
                .as_ref()
                .map_or_else(String::new, |t| format!(", team {t}")),
            table::experiment_table(&e.variants)
        ));
    }
    Ok(out)
}
