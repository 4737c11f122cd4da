//! SVG charts for reports.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

const SIZE: (u32, u32) = (720, 420);
const PALETTE: [RGBColor; 4] = [RGBColor(90, 90, 90), RGBColor(220, 120, 40), RGBColor(40, 110, 200), RGBColor(60, 160, 90)];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

/// Lines over layers, e.g. gate accuracy/TPR/FPR; `mark` draws a vertical line.
pub fn lines(path: &Path, title: &str, x_label: &str, series: &[(&str, Vec<(f64, f64)>)], mark: Option<f64>) -> Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x));
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), 0.0..1.0)
        .map_err(err)?;
    chart.configure_mesh().x_desc(x_label).draw().map_err(err)?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = PALETTE[(i + 1) % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    if let Some(x) = mark {
        chart.draw_series(LineSeries::new([(x, 0.0), (x, 1.0)], BLACK.mix(0.4))).map_err(err)?;
    }
    chart.configure_series_labels().border_style(BLACK.mix(0.3)).background_style(WHITE).draw().map_err(err)?;
    root.present().map_err(err)
}

/// Overlaid histograms of two score samples, with the decision boundary at 0.
pub fn histogram(path: &Path, title: &str, samples: &[(&str, Vec<f32>)]) -> Result<()> {
    let all = samples.iter().flat_map(|(_, s)| s.iter().copied());
    let (lo, hi) = all.fold((f32::MAX, f32::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (lo, hi) = (lo.min(0.0) as f64, hi.max(0.0) as f64 + 1e-6);
    let bins = 30;
    let width = (hi - lo) / bins as f64;
    let counts: Vec<Vec<u32>> = samples
        .iter()
        .map(|(_, s)| {
            let mut c = vec![0u32; bins];
            for &x in s {
                c[(((x as f64 - lo) / width) as usize).min(bins - 1)] += 1;
            }
            c
        })
        .collect();
    let top = counts.iter().flatten().copied().max().unwrap_or(1) as f64;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(lo..hi, 0.0..top * 1.1)
        .map_err(err)?;
    chart.configure_mesh().x_desc("gate score (a . s_hat + b)").y_desc("prompts").draw().map_err(err)?;
    for (i, ((name, _), c)) in samples.iter().zip(&counts).enumerate() {
        let color = PALETTE[(i + 1) % PALETTE.len()];
        chart
            .draw_series(c.iter().enumerate().map(|(b, &n)| {
                let x = lo + b as f64 * width;
                Rectangle::new([(x, 0.0), (x + width, n as f64)], color.mix(0.45).filled())
            }))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.mix(0.45).filled()));
    }
    chart.draw_series(LineSeries::new([(0.0, 0.0), (0.0, top * 1.1)], BLACK.mix(0.6))).map_err(err)?;
    chart.configure_series_labels().border_style(BLACK.mix(0.3)).background_style(WHITE).draw().map_err(err)?;
    root.present().map_err(err)
}

/// Grouped bars: one group per metric, one bar per mode; values in 0..1.
pub fn grouped_bars(path: &Path, title: &str, metrics: &[&str], modes: &[(&str, Vec<f64>)]) -> Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let groups = metrics.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..groups, 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(metrics.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < metrics.len() {
                metrics[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(err)?;
    let bar = 0.8 / modes.len() as f64;
    for (m, (name, values)) in modes.iter().enumerate() {
        let color = PALETTE[m % PALETTE.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(g, &v)| {
                let x = g as f64 + 0.1 + m as f64 * bar;
                Rectangle::new([(x, 0.0), (x + bar * 0.9, v)], color.filled())
            }))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart.configure_series_labels().border_style(BLACK.mix(0.3)).background_style(WHITE).draw().map_err(err)?;
    root.present().map_err(err)
}
