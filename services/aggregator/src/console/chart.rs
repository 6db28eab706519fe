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
/// Periods up to this long get a dot per day of consumed seats.
const MAX_DOTTED_DAYS: usize = 31;

/// `x,y` points of one series over the plot area.
fn points(values: &[i64], max: i64) -> String {
    let plot_width = WIDTH - LEFT - RIGHT;
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
            let y = y_of(value, max);
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Half the width of the short line that stands for a single day's value, which a polyline of one point cannot draw.
const SINGLE_DAY_HALF_WIDTH: f64 = 40.0;

/// The y of `value` on the plot.
fn y_of(value: i64, max: i64) -> f64 {
    let plot_height = HEIGHT - TOP - BOTTOM;
    TOP + plot_height * (1.0 - value.max(0) as f64 / max.max(1) as f64)
}

/// Baselines of the consumed and purchased value labels beside lines at `consumed_y` and `purchased_y`: level with
/// their lines, pushed apart to a line of text when the lines are close (or equal), and kept inside the plot.
fn value_label_ys(consumed_y: f64, purchased_y: f64) -> (f64, f64) {
    // 13px text: its baseline sits about 4px below the middle of the line it labels.
    const APART: f64 = 16.0;
    const HALF_TEXT: f64 = 4.0;
    let (upper, lower) = if consumed_y <= purchased_y {
        (consumed_y, purchased_y)
    } else {
        (purchased_y, consumed_y)
    };
    let (mut upper, mut lower) = if lower - upper < APART {
        let middle = (upper + lower) / 2.0;
        (middle - APART / 2.0, middle + APART / 2.0)
    } else {
        (upper, lower)
    };
    let (top, bottom) = (TOP + 8.0, HEIGHT - BOTTOM - 8.0);
    if upper < top {
        lower += top - upper;
        upper = top;
    }
    if lower > bottom {
        upper -= lower - bottom;
        lower = bottom;
    }
    let (upper, lower) = (upper + HALF_TEXT, lower + HALF_TEXT);
    if consumed_y <= purchased_y {
        (upper, lower)
    } else {
        (lower, upper)
    }
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
    let middle_x = LEFT + (WIDTH - LEFT - RIGHT) / 2.0;
    let description = match days {
        [] => "No usage recorded in this period.".to_owned(),
        [day] => format!(
            "One day recorded, {first}: {} seats consumed, {} purchased.",
            day.consumed, day.purchased
        ),
        _ => format!(
            "Consumed and purchased seats per day from {first} to {last}; the highest value shown is {max}."
        ),
    };
    // A middle tick only where it is a whole number of seats.
    let middle_tick = (max >= 2 && max % 2 == 0).then_some(max / 2);
    html! {
        svg #usage-chart role="img" aria-labelledby="usage-chart-title usage-chart-desc"
            viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) width="100%" preserveAspectRatio="xMidYMid meet" {
            title #usage-chart-title { "Usage history" }
            desc #usage-chart-desc { (description) }
            @if let Some(tick) = middle_tick {
                line.grid x1=(LEFT) y1=(y_of(tick, max)) x2=(WIDTH - RIGHT) y2=(y_of(tick, max)) {}
                text.axis-label x=(LEFT - 6.0) y=(y_of(tick, max) + 4.0) text-anchor="end" { (tick) }
            }
            line.grid x1=(LEFT) y1=(TOP) x2=(WIDTH - RIGHT) y2=(TOP) {}
            line.axis x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(baseline) {}
            line.axis x1=(LEFT) y1=(baseline) x2=(WIDTH - RIGHT) y2=(baseline) {}
            text.axis-title x="14" y=((TOP + baseline) / 2.0) text-anchor="middle"
                transform=(format!("rotate(-90 14 {})", (TOP + baseline) / 2.0)) { "Seats" }
            text.axis-label x=(LEFT - 6.0) y=(TOP + 4.0) text-anchor="end" { (max) }
            text.axis-label x=(LEFT - 6.0) y=(baseline) text-anchor="end" { "0" }
            @match days {
                [] => {
                    text.axis-label x=(middle_x) y=(HEIGHT - 6.0) text-anchor="middle" { "Day" }
                    text.no-data x=(middle_x) y=((TOP + baseline) / 2.0) text-anchor="middle" { "No usage recorded yet" }
                }
                [day] => {
                    // One day: a short line per series around the middle, a dot, and the values written beside it.
                    @let (consumed_y, purchased_y) = (y_of(day.consumed, max), y_of(day.purchased, max));
                    @let (consumed_label_y, purchased_label_y) = value_label_ys(consumed_y, purchased_y);
                    text.axis-label x=(middle_x) y=(HEIGHT - 6.0) text-anchor="middle" { (first) }
                    line.series-purchased x1=(middle_x - SINGLE_DAY_HALF_WIDTH) y1=(purchased_y)
                        x2=(middle_x + SINGLE_DAY_HALF_WIDTH) y2=(purchased_y) {}
                    line.series-consumed x1=(middle_x - SINGLE_DAY_HALF_WIDTH) y1=(consumed_y)
                        x2=(middle_x + SINGLE_DAY_HALF_WIDTH) y2=(consumed_y) {}
                    circle.point-consumed cx=(middle_x) cy=(consumed_y) r="4" {}
                    text.value-consumed x=(middle_x + SINGLE_DAY_HALF_WIDTH + 8.0) y=(consumed_label_y) {
                        (day.consumed) " consumed"
                    }
                    text.value-purchased x=(middle_x + SINGLE_DAY_HALF_WIDTH + 8.0) y=(purchased_label_y) {
                        (day.purchased) " purchased"
                    }
                }
                _ => {
                    text.axis-label x=(LEFT) y=(HEIGHT - 6.0) text-anchor="start" { (first) }
                    text.axis-label x=(middle_x) y=(HEIGHT - 6.0) text-anchor="middle" { "Day" }
                    text.axis-label x=(WIDTH - RIGHT) y=(HEIGHT - 6.0) text-anchor="end" { (last) }
                    polyline.series-purchased points=(points(&purchased, max)) fill="none" {}
                    polyline.series-consumed points=(points(&consumed, max)) fill="none" {}
                    // Dots on short periods: a few days read better as dots.
                    @if days.len() <= MAX_DOTTED_DAYS {
                        @for point in points(&consumed, max).split(' ').filter(|point| !point.is_empty()) {
                            @if let Some((x, y)) = point.split_once(',') {
                                circle.point-consumed cx=(x) cy=(y) r="3" {}
                            }
                        }
                    }
                }
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

    fn history(values: &[(i64, i64)]) -> Vec<UsageDay> {
        values
            .iter()
            .enumerate()
            .map(|(index, &(consumed, purchased))| UsageDay {
                date: format!("2026-{:02}-{:02}", 1 + index / 28, 1 + index % 28),
                consumed,
                max_consumed: consumed,
                purchased,
                instances: vec![],
            })
            .collect()
    }

    #[test]
    fn a_single_day_is_drawn_as_short_lines_with_its_values() {
        let drawn = usage_chart(&history(&[(6, 3)])).into_string();
        assert_eq!(drawn.matches("<line class=\"series-consumed\"").count(), 1);
        assert_eq!(drawn.matches("<line class=\"series-purchased\"").count(), 1);
        assert!(drawn.contains(">6 consumed</text>"), "{drawn}");
        assert!(drawn.contains(">3 purchased</text>"), "{drawn}");
        assert!(drawn.contains("2026-01-01"));
        assert!(drawn.contains(">Seats</text>"));
        // The consumed line is the top of the scale, the purchased one half way down.
        assert!(drawn.contains(&format!("y1=\"{TOP}\"")));
        assert!(!drawn.contains("<polyline"));
    }

    #[test]
    fn two_and_ninety_days_are_polylines_dotted_only_when_short() {
        let two = usage_chart(&history(&[(1, 4), (2, 4)])).into_string();
        assert_eq!(two.matches("<polyline").count(), 2);
        assert_eq!(two.matches("class=\"point-consumed\"").count(), 2);
        assert!(two.contains("2026-01-01") && two.contains("2026-01-02"));
        assert!(two.contains(">Day</text>"));
        let ninety: Vec<(i64, i64)> = (0..90).map(|day| (day, 50)).collect();
        let long = usage_chart(&history(&ninety)).into_string();
        assert_eq!(long.matches("<polyline").count(), 2);
        assert_eq!(long.matches("class=\"point-consumed\"").count(), 0);
        assert!(long.contains("highest value shown is 89"));
    }

    #[test]
    fn single_day_labels_stay_apart_and_inside_the_plot() {
        for (consumed, purchased) in [(6, 6), (6, 5), (0, 0), (3, 6), (6, 3)] {
            let (consumed_y, purchased_y) = value_label_ys(y_of(consumed, 6), y_of(purchased, 6));
            assert!(
                (consumed_y - purchased_y).abs() >= 16.0,
                "{consumed} and {purchased}"
            );
            for y in [consumed_y, purchased_y] {
                assert!(
                    y > TOP + 8.0 && y < HEIGHT - BOTTOM,
                    "{consumed} and {purchased}: {y}"
                );
            }
            // The higher value's label is the upper one.
            assert_eq!(
                consumed_y < purchased_y,
                consumed >= purchased,
                "{consumed} and {purchased}"
            );
        }
    }

    #[test]
    fn no_day_says_so_in_the_chart() {
        let drawn = usage_chart(&[]).into_string();
        assert!(drawn.contains("No usage recorded yet"));
        assert!(!drawn.contains("series-consumed"));
    }
}
