//! Plots a person can read at a glance: deferral curves (quality against escalation rate,
//! with random and oracle baselines) and the learned rule's reliability diagram, each as SVG
//! and PNG. Text in PNGs is drawn with an embedded DejaVu Sans, so no system font is needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::EvalError;

/// The embedded font (DejaVu Sans; licence in `router/assets/fonts/`).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Registers the embedded font once; plotters' bitmap backend has no other font source.
fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
                .map_err(|_| "embedded font is invalid".to_owned())
        })
        .clone()
}

/// How a line is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    /// A confidence rule.
    Solid,
    /// A baseline (random).
    Dashed,
    /// The upper bound (oracle).
    Dotted,
}

/// One line of a plot.
#[derive(Clone, Debug)]
pub struct Line {
    /// Legend text.
    pub label: String,
    /// (x, y) points.
    pub points: Vec<(f64, f64)>,
    /// Colour.
    pub color: RGBColor,
    /// Solid, dashed or dotted.
    pub kind: LineKind,
    /// Stroke width in pixels.
    pub width: u32,
}

/// A line chart.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// X range.
    pub x_range: (f64, f64),
    /// Y range.
    pub y_range: (f64, f64),
    /// The lines, drawn in order (later on top).
    pub lines: Vec<Line>,
    /// Whether to mark every point (for few-point lines such as reliability bins).
    pub markers: bool,
}

/// Colours that stay distinct for colour-blind readers (Okabe-Ito).
pub const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(240, 228, 66),
];

/// Writes `<stem>.svg` and `<stem>.png`; returns both paths.
pub fn write_chart(chart: &Chart, stem: &Path) -> Result<(PathBuf, PathBuf), EvalError> {
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    let size = (960, 640);
    let fail = |path: &Path| {
        let path = path.to_owned();
        move |message: String| EvalError::Plot { path, message }
    };
    register_font().map_err(fail(&png))?;
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw(&root, chart).map_err(fail(&svg))?;
    }
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw(&root, chart).map_err(fail(&png))?;
    }
    Ok((svg, png))
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &Chart) -> Result<(), String> {
    let e = |err: DrawingAreaErrorKind<DB::ErrorType>| err.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut c = ChartBuilder::on(root)
        .caption(&chart.title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(
            chart.x_range.0..chart.x_range.1,
            chart.y_range.0..chart.y_range.1,
        )
        .map_err(e)?;
    c.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .x_labels(11)
        .y_labels(11)
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .light_line_style(RGBColor(246, 246, 246))
        .draw()
        .map_err(e)?;
    for line in &chart.lines {
        let style = ShapeStyle {
            color: line.color.to_rgba(),
            filled: true,
            stroke_width: line.width,
        };
        let points = line.points.iter().copied();
        let anno = match line.kind {
            LineKind::Solid => c.draw_series(LineSeries::new(points, style)).map_err(e)?,
            LineKind::Dashed => c
                .draw_series(DashedLineSeries::new(points, 10, 6, style))
                .map_err(e)?,
            LineKind::Dotted => c
                .draw_series(DashedLineSeries::new(points, 3, 4, style))
                .map_err(e)?,
        };
        anno.label(line.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        if chart.markers && line.kind == LineKind::Solid {
            c.draw_series(line.points.iter().map(|&p| Circle::new(p, 4, style)))
                .map_err(e)?;
        }
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(160, 160, 160))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
