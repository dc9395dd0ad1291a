//! `cascade eval`: generate and grade answers on a labeled set (or load saved runs), then
//! score every confidence rule and write the table, the JSON summary and the plots.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use local_model::LocalModel;

use crate::cli::{EscalationArgs, EvalArgs};
use crate::eval::datasets::{select, Dataset};
use crate::eval::generate::generate_run;
use crate::eval::plot::{write_chart, Chart, Line, LineKind, PALETTE};
use crate::eval::record::{read_records, EvalRecord};
use crate::eval::report::{evaluate, write_table, Evaluation, Settings};

/// The files one evaluation wrote.
#[derive(Debug, Clone)]
pub struct EvalOutputs {
    /// The saved run (only when the model was run).
    pub run: Option<PathBuf>,
    /// The JSON summary.
    pub summary: PathBuf,
    /// The deferral plot, SVG and PNG.
    pub plots: (PathBuf, PathBuf),
    /// What was computed.
    pub evaluation: Evaluation,
}

/// Runs the command, printing the table to stdout.
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let outputs = execute(args)?;
    let mut stdout = std::io::stdout().lock();
    write_table(&mut stdout, &outputs.evaluation.summary)?;
    if let Some(run) = &outputs.run {
        writeln!(stdout, "run: {}", run.display())?;
    }
    writeln!(
        stdout,
        "summary: {}\nplots: {}, {}",
        outputs.summary.display(),
        outputs.plots.0.display(),
        outputs.plots.1.display()
    )?;
    Ok(())
}

/// Settings from the command line.
pub fn settings(e: &EscalationArgs) -> Settings {
    Settings {
        remote_accuracy: e.remote_accuracy,
        price_input_per_million: e.price_input,
        price_output_per_million: e.price_output,
        folds: e.folds,
        seed: e.seed,
    }
}

/// Does the work and returns what it wrote (the integration test calls this).
pub fn execute(args: &EvalArgs) -> anyhow::Result<EvalOutputs> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let (records, run) = if args.rescore.is_empty() {
        let (records, path) = generate(args)?;
        (records, Some(path))
    } else {
        let mut records = Vec::new();
        for path in &args.rescore {
            records.extend(read_records(path)?);
        }
        if args.regrade {
            for r in &mut records {
                if let Some(g) = &r.grader {
                    r.correct = Some(g.grade(&r.output));
                }
            }
        }
        (records, None)
    };
    let settings = settings(&args.escalation);
    let evaluation = evaluate(&records, &settings, "eval")?;
    let summary = args.out.join("summary.json");
    std::fs::write(&summary, serde_json::to_string_pretty(&evaluation.summary)?)
        .with_context(|| format!("writing {}", summary.display()))?;
    let plots = write_chart(&deferral_chart(&evaluation), &args.out.join("deferral"))?;
    Ok(EvalOutputs {
        run,
        summary,
        plots,
        evaluation,
    })
}

/// Loads the set and the model, and writes `run.jsonl` while generating.
fn generate(args: &EvalArgs) -> anyhow::Result<(Vec<EvalRecord>, PathBuf)> {
    let dataset: Dataset = args
        .dataset
        .as_deref()
        .context("--dataset is required unless --rescore is given")?
        .parse()?;
    let model_spec = args
        .model
        .as_deref()
        .context("--model is required unless --rescore is given")?;
    let mut items = select(
        dataset.load(&args.data_dir)?,
        args.limit,
        args.escalation.seed,
    );
    if let Some(shard) = &args.shard {
        let (k, n) = parse_shard(shard)?;
        items = items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % n == k)
            .map(|(_, item)| item)
            .collect();
    }
    if let Some(max_tokens) = args.max_tokens {
        for item in &mut items {
            item.max_tokens = max_tokens;
        }
    }
    let mut model = LocalModel::load(model_spec, &args.load.options()?)?;
    let path = args.out.join("run.jsonl");
    let records = generate_run(&mut model, &items, &dataset.name(), &path, !args.quiet)?;
    Ok((records, path))
}

fn parse_shard(s: &str) -> anyhow::Result<(usize, usize)> {
    let (k, n) = s.split_once('/').context("--shard must be K/N")?;
    let (k, n): (usize, usize) = (k.trim().parse()?, n.trim().parse()?);
    anyhow::ensure!(n > 0 && k < n, "--shard K/N needs 0 <= K < N");
    Ok((k, n))
}

/// The deferral plot: mean log-prob (the plain baseline), the two best other fixed rules by
/// APGR and the learned rule, against random and oracle escalation. Every rule would be
/// unreadable; the JSON summary has them all.
pub fn deferral_chart(e: &Evaluation) -> Chart {
    let s = &e.summary;
    let apgr_of = |r: &crate::eval::report::RuleSummary| r.apgr.unwrap_or(f64::NEG_INFINITY);
    let mut others: Vec<usize> = (1..s.rules.len())
        .filter(|&i| s.rules[i].name != "learned")
        .collect();
    others.sort_by(|&a, &b| apgr_of(&s.rules[b]).total_cmp(&apgr_of(&s.rules[a])));
    let mut shown: Vec<usize> = vec![0];
    shown.extend(others.into_iter().take(2));
    shown.extend(s.rules.iter().position(|r| r.name == "learned"));
    let label = |r: &crate::eval::report::RuleSummary| match r.apgr {
        Some(a) => format!("{} (APGR {a:.2})", r.name),
        None => r.name.clone(),
    };
    let rates: Vec<f64> = (0..=100).map(|i| f64::from(i) / 100.0).collect();
    let line = |r: &crate::eval::report::RuleSummary, color, kind, width| Line {
        label: label(r),
        points: rates.iter().copied().zip(r.curve.iter().copied()).collect(),
        color,
        kind,
        width,
    };
    let mut lines = vec![
        line(
            &s.oracle,
            plotters::style::RGBColor(40, 40, 40),
            LineKind::Dotted,
            2,
        ),
        line(
            &s.random,
            plotters::style::RGBColor(130, 130, 130),
            LineKind::Dashed,
            2,
        ),
    ];
    for (n, &i) in shown.iter().enumerate() {
        lines.push(line(
            &s.rules[i],
            PALETTE[n % PALETTE.len()],
            LineKind::Solid,
            3,
        ));
    }
    let lowest = s
        .rules
        .iter()
        .chain([&s.random])
        .flat_map(|r| r.curve.first())
        .fold(1.0f64, |a, b| a.min(*b));
    Chart {
        title: format!(
            "{}: quality vs escalation ({} items, local {:.0}%)",
            s.dataset,
            s.items,
            100.0 * s.local_accuracy
        ),
        x_label: "escalation rate (share of requests sent to the remote model)".to_owned(),
        y_label: "quality (share correct)".to_owned(),
        x_range: (0.0, 1.0),
        y_range: (
            (lowest - 0.02).max(0.0),
            s.settings.remote_accuracy.max(s.local_accuracy) + 0.02,
        ),
        lines,
        markers: false,
    }
}
