//! Plain-text tables for the terminal.

use super::stats::{Estimate, VariantStats};
use crate::accounts::TeamSpend;

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
                format!(
                    "{} ({})",
                    estimate(s.mean_feedback, 1.0, 2),
                    s.feedback_count
                ),
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

/// The spend-by-team table of one window.
pub fn spend_table(teams: &[TeamSpend]) -> String {
    let money = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.6}"));
    let rows: Vec<Vec<String>> = teams
        .iter()
        .map(|t| {
            let u = &t.usage;
            vec![
                if t.team.is_empty() {
                    "(none)".into()
                } else {
                    t.team.clone()
                },
                u.requests.to_string(),
                u.escalation_rate
                    .map_or_else(|| "-".into(), |r| format!("{:.1}", 100.0 * r)),
                format!("{:.6}", u.cost_usd),
                money(u.budget_usd),
                format!("{:.6}", u.budget_spent_usd),
                money(u.budget_remaining_usd),
            ]
        })
        .collect();
    render(
        &[
            "team",
            "requests",
            "escalated %",
            "cost USD",
            "budget USD",
            "budget spent USD",
            "budget left USD",
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
