//! The overview's usage-history chart: consumed and purchased seats per day as inline SVG, drawn on the server so
//! that it shows without JS, with a title and description for screen readers and the same figures in a table
//! under it.

use maud::{Markup, html};

use crate::store::UsageDay;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 240.0;
/// Room for the axis labels on the left and at the bottom.
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 12.0;
const RIGHT: f64 = 12.0;

/// `x,y` points of one series over the plot area.
fn points(values: &[i64], max: i64) -> String {
    let plot_width = WIDTH - LEFT - RIGHT;
    let plot_height = HEIGHT - TOP - BOTTOM;
    let step = if values.len() > 1 {
        plot_width / (values.len() - 1) as f64
    } else {
        0.0
    };
    values
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            let x = LEFT + step * index as f64;
            let y = TOP + plot_height * (1.0 - value.max(0) as f64 / max.max(1) as f64);
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `svg#usage-chart` for `days` (oldest first).
pub(super) fn usage_chart(days: &[UsageDay]) -> Markup {
    let consumed: Vec<i64> = days.iter().map(|day| day.consumed).collect();
    let purchased: Vec<i64> = days.iter().map(|day| day.purchased).collect();
    let max = consumed
        .iter()
        .chain(&purchased)
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    let first = days.first().map(|day| day.date.as_str()).unwrap_or("");
    let last = days.last().map(|day| day.date.as_str()).unwrap_or("");
    let baseline = HEIGHT - BOTTOM;
    let description = if days.is_empty() {
        "No usage recorded in this period.".to_owned()
    } else {
        format!(
            "Consumed and purchased seats per day from {first} to {last}; the highest value shown is {max}."
        )
    };
    html! {
        svg #usage-chart role="img" aria-labelledby="usage-chart-title usage-chart-desc"
            viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) width="100%" preserveAspectRatio="xMidYMid meet" {
            title #usage-chart-title { "Usage history" }
            desc #usage-chart-desc { (description) }
            line.axis x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(baseline) {}
            line.axis x1=(LEFT) y1=(baseline) x2=(WIDTH - RIGHT) y2=(baseline) {}
            text.axis-label x=(LEFT - 6.0) y=(TOP + 4.0) text-anchor="end" { (max) }
            text.axis-label x=(LEFT - 6.0) y=(baseline) text-anchor="end" { "0" }
            text.axis-label x=(LEFT) y=(HEIGHT - 6.0) text-anchor="start" { (first) }
            text.axis-label x=(WIDTH - RIGHT) y=(HEIGHT - 6.0) text-anchor="end" { (last) }
            @if !days.is_empty() {
                polyline.series-purchased points=(points(&purchased, max)) fill="none" {}
                polyline.series-consumed points=(points(&consumed, max)) fill="none" {}
            }
        }
        p.legend {
            span.key-consumed { "Consumed" } " " span.key-purchased { "Purchased" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_span_the_plot_and_scale_to_the_maximum() {
        let drawn = points(&[0, 5, 10], 10);
        let pairs: Vec<(f64, f64)> = drawn
            .split(' ')
            .map(|pair| {
                let (x, y) = pair.split_once(',').expect("x,y");
                (x.parse().expect("x"), y.parse().expect("y"))
            })
            .collect();
        assert_eq!(pairs.len(), 3);
        assert_eq!(pairs[0], (LEFT, HEIGHT - BOTTOM));
        assert_eq!(pairs[2], (WIDTH - RIGHT, TOP));
        assert!((pairs[1].1 - (TOP + (HEIGHT - TOP - BOTTOM) / 2.0)).abs() < 0.1);
    }
}
