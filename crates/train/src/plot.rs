//! The loss curve of a run as an SVG (`RUN_DIR/loss.svg`): training loss per optimizer step
//! and validation loss at each epoch end, per target token.

use std::path::Path;

use plotters::prelude::*;

use crate::checkpoint::EpochRecord;
use crate::{Error, Result};

/// Draws `curve` (`[step, training loss]` points) and the validation losses of `epochs` into
/// an SVG file at `path`, written atomically.
pub fn write_loss_curve(path: &Path, curve: &[[f64; 2]], epochs: &[EpochRecord]) -> Result<()> {
    let svg = render(curve, epochs).map_err(|message| Error::Plot {
        path: path.to_path_buf(),
        message,
    })?;
    crate::checkpoint::write_atomic(path, svg.as_bytes())
}

fn render(curve: &[[f64; 2]], epochs: &[EpochRecord]) -> std::result::Result<String, String> {
    let valid: Vec<(f64, f64)> = epochs
        .iter()
        .map(|r| (r.step as f64, r.valid_loss))
        .filter(|p| p.1.is_finite())
        .collect();
    let train = smooth(curve);
    let ys = train.iter().map(|p| p.1).chain(valid.iter().map(|p| p.1));
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo.min(0.0), hi * 1.05 + 1e-9)
    } else {
        (0.0, 1.0)
    };
    let last = train
        .iter()
        .map(|p| p.0)
        .chain(valid.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("loss per target token", ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..last, lo..hi)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss")
            .draw()
            .map_err(e)?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
            .map_err(e)?
            .label("train (smoothed)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(valid.iter().copied(), &RED))
            .map_err(e)?;
        chart
            .draw_series(valid.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(e)?
            .label("validation")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

/// Means over windows, at most 500 points.
fn smooth(curve: &[[f64; 2]]) -> Vec<(f64, f64)> {
    let finite: Vec<[f64; 2]> = curve.iter().copied().filter(|p| p[1].is_finite()).collect();
    let window = finite.len().div_ceil(500).max(1);
    finite
        .chunks(window)
        .map(|c| {
            let n = c.len() as f64;
            (c[c.len() - 1][0], c.iter().map(|p| p[1]).sum::<f64>() / n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_both_series() {
        let curve: Vec<[f64; 2]> = (1..=1200)
            .map(|s| [s as f64, 5.0 / (s as f64).sqrt()])
            .collect();
        let epochs = vec![EpochRecord {
            epoch: 1,
            step: 1200,
            lr: 1e-3,
            train_loss: 0.2,
            valid_loss: 0.3,
            valid_accuracy: 90.0,
            valid_perplexity: 1.4,
            valid_mlm_loss: None,
            valid_mlm_accuracy: None,
            generation: None,
        }];
        let svg = render(&curve, &epochs).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        assert!(svg.contains("validation") && svg.contains("optimizer step"));
        assert!(svg.matches("<circle").count() >= 1);
        assert_eq!(smooth(&curve).len(), 400);
    }
}
