//! Plain-text tables for the terminal.

use super::stats::{Estimate, VariantStats};
use crate::storage::UsageSummary;

/// Formats rows as left-aligned columns under a header.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| -> String {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out.push('\n');
    out
}

fn estimate(e: Option<Estimate>, scale: f64, digits: usize) -> String {
    match e {
        Some(e) => format!(
            "{:.d$} [{:.d$}, {:.d$}]",
            e.value * scale,
            e.low * scale,
            e.high * scale,
            d = digits
        ),
        None => "-".into(),
    }
}

/// The per-variant table of an experiment.
pub fn experiment_table(stats: &[VariantStats]) -> String {
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.variant.clone(),
                s.requests.to_string(),
                estimate(s.escalation_rate, 100.0, 1),
                estimate(s.cost_per_1k_requests_usd, 1.0, 4),
                estimate(s.latency_p50_ms, 1.0, 0),
                estimate(s.latency_p95_ms, 1.0, 0),
                format!("{} ({})", estimate(s.mean_feedback, 1.0, 2), s.feedback_count),
            ]
        })
        .collect();
    render(
        &[
            "variant",
            "requests",
            "escalated % [95% CI]",
            "USD / 1k req",
            "p50 ms",
            "p95 ms",
            "feedback (n)",
        ],
        &rows,
    )
}

/// The spend-by-team table.
pub fn spend_table(rows: &[(String, UsageSummary)]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|(team, u)| {
            let rate = if u.requests > 0 {
                100.0 * u.escalated as f64 / u.requests as f64
            } else {
                0.0
            };
            vec![
                team.clone(),
                u.requests.to_string(),
                format!("{rate:.1}"),
                format!("{:.6}", u.cost_nanos as f64 / 1e9),
                u.local_tokens.to_string(),
                u.remote_input_tokens.to_string(),
                u.remote_output_tokens.to_string(),
            ]
        })
        .collect();
    render(
        &[
            "team",
            "requests",
            "escalated %",
            "spend USD",
            "local tokens",
            "remote in",
            "remote out",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let out = render(&["a", "bb"], &[vec!["long".into(), "x".into()]]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "a     bb");
        assert_eq!(lines[1], "----  --");
        assert_eq!(lines[2], "long  x");
    }
}
