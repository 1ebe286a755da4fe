//! Small inline SVG charts of the last hour, rendered on the server (no
//! chart library, no script): a frame, the top of the scale, one line per
//! series. Each chart is an image to assistive technology (`role="img"`,
//! `aria-label` and `<title>` saying the current value), its colours pass
//! WCAG AA on white (text 4.5:1, lines 3:1), and the second series is
//! dashed so colour is not the only cue.
//!
//! Handles no point (a "no data" note), one point (a dot) and many (a
//! line). Counter resets (a new QEMU starts its counters at zero) are
//! handled where rates are computed ([`rates`]).

use std::fmt::Write;

use super::{Sample, WINDOW};

/// Frame and text colour (#1f2328 on #ffffff: 15.8:1).
const INK: &str = "#1f2328";
/// Frame lines (#6e7781 on white: 4.6:1).
const RULE: &str = "#6e7781";
const BACKGROUND: &str = "#ffffff";
/// Series colours, each at least 4.5:1 on white (their legend is text).
pub const CPU_COLOUR: &str = "#0b5cad";
pub const IN_COLOUR: &str = "#1a7f37";
pub const OUT_COLOUR: &str = "#a0430a";

const WIDTH: u32 = 320;
const HEIGHT: u32 = 90;
/// Room above the plot for the scale and the legend.
const TOP: f64 = 16.0;
const PAD: f64 = 2.0;

/// How the values of a chart read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Percent of one CPU core.
    PercentOfCore,
    BytesPerSecond,
}

impl Unit {
    pub fn format(self, v: f64) -> String {
        match self {
            Unit::PercentOfCore => {
                if v < 10.0 {
                    format!("{v:.1} %")
                } else {
                    format!("{v:.0} %")
                }
            }
            Unit::BytesPerSecond => {
                let units = ["B/s", "kB/s", "MB/s", "GB/s"];
                let mut v = v;
                let mut i = 0;
                while v >= 1000.0 && i + 1 < units.len() {
                    v /= 1000.0;
                    i += 1;
                }
                if i == 0 || v >= 10.0 {
                    format!("{v:.0} {}", units[i])
                } else {
                    format!("{v:.1} {}", units[i])
                }
            }
        }
    }

    /// The smallest top of scale: a near-idle VM is a flat line near the
    /// bottom, not noise blown up to full height.
    fn min_scale(self) -> f64 {
        match self {
            Unit::PercentOfCore => 1.0,
            Unit::BytesPerSecond => 1000.0,
        }
    }
}

/// One chart's settings.
#[derive(Debug, Clone)]
pub struct ChartOptions {
    /// What the chart shows, e.g. "CPU (% of one core), last hour".
    pub label: String,
    /// Said after the label with the current value ("now").
    pub now_word: String,
    /// Shown when there is no point.
    pub no_data: String,
    pub unit: Unit,
    pub colour: String,
    /// The right edge, unix seconds; default: the last point.
    pub end: Option<i64>,
}

/// One line of a chart.
struct Series<'a> {
    name: Option<&'a str>,
    points: &'a [(i64, f64)],
    colour: &'a str,
    dashed: bool,
}

/// A one-series chart of `points` (unix seconds, value), oldest first.
pub fn svg(points: &[(i64, f64)], opts: &ChartOptions) -> String {
    render(
        &[Series {
            name: None,
            points,
            colour: &opts.colour,
            dashed: false,
        }],
        opts,
    )
}

/// The words of the dashboard's charts, in the page's language.
#[derive(Debug, Clone)]
pub struct ChartLabels {
    pub cpu: String,
    pub network: String,
    pub inbound: String,
    pub outbound: String,
    pub now: String,
    pub no_data: String,
}

impl ChartLabels {
    pub fn english() -> ChartLabels {
        ChartLabels {
            cpu: "CPU (% of one core), last hour".into(),
            network: "Network, last hour".into(),
            inbound: "in".into(),
            outbound: "out".into(),
            now: "now".into(),
            no_data: "No data yet".into(),
        }
    }

    pub fn korean() -> ChartLabels {
        ChartLabels {
            cpu: "CPU (코어 1개 기준 %), 최근 1시간".into(),
            network: "네트워크, 최근 1시간".into(),
            inbound: "수신".into(),
            outbound: "송신".into(),
            now: "현재".into(),
            no_data: "아직 데이터가 없습니다".into(),
        }
    }
}

/// The dashboard's two charts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourCharts {
    /// CPU as % of one core.
    pub cpu_svg: String,
    /// Network bytes/s received (solid) and sent (dashed).
    pub net_svg: String,
}

/// CPU and network charts of `history` (oldest first, as
/// [`super::Usage::history`] gives it), ending at its last sample.
pub fn hour_charts(history: &[Sample], labels: &ChartLabels) -> HourCharts {
    let end = history.last().map(|s| s.at);
    let cpu: Vec<(i64, f64)> = rates(history, |s| s.cpu_seconds)
        .into_iter()
        .map(|(t, v)| (t, v * 100.0))
        .collect();
    let rx = rates(history, |s| s.net_rx_bytes as f64);
    let tx = rates(history, |s| s.net_tx_bytes as f64);
    let cpu_opts = ChartOptions {
        label: labels.cpu.clone(),
        now_word: labels.now.clone(),
        no_data: labels.no_data.clone(),
        unit: Unit::PercentOfCore,
        colour: CPU_COLOUR.into(),
        end,
    };
    let net_opts = ChartOptions {
        label: labels.network.clone(),
        unit: Unit::BytesPerSecond,
        colour: IN_COLOUR.into(),
        ..cpu_opts.clone()
    };
    HourCharts {
        cpu_svg: svg(&cpu, &cpu_opts),
        net_svg: render(
            &[
                Series {
                    name: Some(&labels.inbound),
                    points: &rx,
                    colour: IN_COLOUR,
                    dashed: false,
                },
                Series {
                    name: Some(&labels.outbound),
                    points: &tx,
                    colour: OUT_COLOUR,
                    dashed: true,
                },
            ],
            &net_opts,
        ),
    }
}

/// Per-second rates of a cumulative counter between consecutive samples,
/// at the later one's time. A counter lower than before was restarted (a
/// new QEMU, a new tap): it counted from zero, so its value is the delta.
pub fn rates(history: &[Sample], counter: impl Fn(&Sample) -> f64) -> Vec<(i64, f64)> {
    history
        .windows(2)
        .filter_map(|w| {
            let (a, b) = (&w[0], &w[1]);
            let dt = b.at - a.at;
            if dt <= 0 {
                return None;
            }
            let (va, vb) = (counter(a), counter(b));
            let delta = if vb >= va { vb - va } else { vb };
            Some((b.at, delta / dt as f64))
        })
        .collect()
}

/// Escape for XML text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The top of the scale: 1, 2 or 5 times a power of ten, at or above `max`.
fn nice_ceiling(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|v| *v >= max * (1.0 - 1e-9))
        .unwrap_or(10.0 * power)
}

/// What the chart says in words: the label and the current value of each
/// series (or that there is none).
fn summary(series: &[Series<'_>], opts: &ChartOptions) -> String {
    let current: Vec<String> = series
        .iter()
        .filter_map(|s| {
            let (_, v) = s.points.last()?;
            let v = opts.unit.format(*v);
            Some(match s.name {
                Some(name) => format!("{name} {v}"),
                None => v,
            })
        })
        .collect();
    if current.is_empty() {
        format!("{}: {}", opts.label, opts.no_data)
    } else {
        format!("{}: {} {}", opts.label, opts.now_word, current.join(", "))
    }
}

fn render(series: &[Series<'_>], opts: &ChartOptions) -> String {
    let (w, h) = (f64::from(WIDTH), f64::from(HEIGHT));
    let text = esc(&summary(series, opts));
    let mut out = String::with_capacity(2048);
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="usage-chart" role="img" aria-label="{text}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}"><title>{text}</title><rect x="0.5" y="0.5" width="{}" height="{}" fill="{BACKGROUND}" stroke="{RULE}"/>"#,
        w - 1.0,
        h - 1.0
    );
    let end = opts
        .end
        .or_else(|| series.iter().filter_map(|s| s.points.last().map(|p| p.0)).max());
    let Some(end) = end.filter(|_| series.iter().any(|s| !s.points.is_empty())) else {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="12" fill="{INK}">{}</text></svg>"#,
            w / 2.0,
            (h + TOP) / 2.0,
            esc(&opts.no_data)
        );
        return out;
    };
    let start = end - WINDOW.as_secs() as i64;
    let visible = |s: &Series<'_>| -> Vec<(i64, f64)> {
        s.points
            .iter()
            .copied()
            .filter(|(t, v)| *t >= start && *t <= end && v.is_finite())
            .collect()
    };
    let max = series
        .iter()
        .flat_map(|s| visible(s).into_iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let top = nice_ceiling(max.max(opts.unit.min_scale()));
    // The scale's top, and the baseline.
    let _ = write!(
        out,
        r#"<text x="4" y="12" font-size="11" fill="{INK}">{}</text><line x1="{PAD}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{RULE}" stroke-width="1"/>"#,
        esc(&opts.unit.format(top)),
        h - PAD,
        w - PAD,
        h - PAD
    );
    // Legend, right-aligned, in each series' colour.
    let named: Vec<&Series<'_>> = series.iter().filter(|s| s.name.is_some()).collect();
    if !named.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="12" font-size="11" text-anchor="end">"#,
            w - 4.0
        );
        for (i, s) in named.iter().enumerate() {
            let dash = if s.dashed { "- -" } else { "—" };
            let sep = if i == 0 { "" } else { "  " };
            let _ = write!(
                out,
                r#"<tspan fill="{}">{sep}{dash} {}</tspan>"#,
                s.colour,
                esc(s.name.unwrap_or_default())
            );
        }
        out.push_str("</text>");
    }
    let x = |t: i64| PAD + (t - start) as f64 / (end - start) as f64 * (w - 2.0 * PAD);
    let y = |v: f64| h - PAD - (v / top).clamp(0.0, 1.0) * (h - TOP - 2.0 * PAD);
    for s in series {
        let points = visible(s);
        let dash = if s.dashed {
            r#" stroke-dasharray="5 3""#
        } else {
            ""
        };
        match points.as_slice() {
            [] => {}
            [(t, v)] => {
                let _ = write!(
                    out,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                    x(*t),
                    y(*v),
                    s.colour
                );
            }
            many => {
                let coords: Vec<String> = many
                    .iter()
                    .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                    .collect();
                let _ = write!(
                    out,
                    r#"<polyline fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"{dash} points="{}"/>"#,
                    s.colour,
                    coords.join(" ")
                );
            }
        }
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ChartOptions {
        let l = ChartLabels::english();
        ChartOptions {
            label: l.cpu,
            now_word: l.now,
            no_data: l.no_data,
            unit: Unit::PercentOfCore,
            colour: CPU_COLOUR.into(),
            end: None,
        }
    }

    fn sample(at: i64, cpu: f64, rx: u64, tx: u64) -> Sample {
        Sample {
            at,
            cpu_seconds: cpu,
            net_rx_bytes: rx,
            net_tx_bytes: tx,
            ..Sample::default()
        }
    }

    /// WCAG relative luminance contrast of two `#rrggbb` colours.
    fn contrast(a: &str, b: &str) -> f64 {
        let lum = |hex: &str| {
            let c = |i: usize| {
                let v = f64::from(u8::from_str_radix(&hex[i..i + 2], 16).unwrap()) / 255.0;
                if v <= 0.03928 {
                    v / 12.92
                } else {
                    ((v + 0.055) / 1.055).powf(2.4)
                }
            };
            0.2126 * c(1) + 0.7152 * c(3) + 0.0722 * c(5)
        };
        let (la, lb) = (lum(a), lum(b));
        (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
    }

    #[test]
    fn colours_pass_wcag_aa_on_the_background() {
        for text in [INK, CPU_COLOUR, IN_COLOUR, OUT_COLOUR] {
            assert!(
                contrast(text, BACKGROUND) >= 4.5,
                "{text}: {}",
                contrast(text, BACKGROUND)
            );
        }
        // Non-text graphics need 3:1.
        assert!(contrast(RULE, BACKGROUND) >= 3.0);
    }

    #[test]
    fn no_point_says_so_in_words() {
        let svg = svg(&[], &opts());
        assert!(svg.starts_with(r#"<svg xmlns="http://www.w3.org/2000/svg" class="usage-chart" role="img" aria-label="CPU (% of one core), last hour: No data yet""#), "{svg}");
        assert!(svg.contains("<title>CPU (% of one core), last hour: No data yet</title>"));
        assert!(svg.contains(">No data yet</text>"));
        assert!(!svg.contains("<polyline") && !svg.contains("<circle"));
        assert!(svg.ends_with("</svg>"));
    }

    #[test]
    fn one_point_is_a_dot_and_many_a_line() {
        let one = svg(&[(1000, 50.0)], &opts());
        assert!(
            one.contains(r#"aria-label="CPU (% of one core), last hour: now 50 %""#),
            "{one}"
        );
        // The point is the right edge; 50 on a scale of 50 is the top.
        assert!(
            one.contains(r##"<circle cx="318.0" cy="18.0" r="3" fill="#0b5cad"/>"##),
            "{one}"
        );
        assert!(!one.contains("<polyline"));

        let many = svg(&[(0, 0.0), (1800, 5.0), (3600, 2.5)], &opts());
        assert!(
            many.contains(r#"aria-label="CPU (% of one core), last hour: now 2.5 %""#),
            "{many}"
        );
        assert!(many.contains(">5.0 %</text>"), "scale top: {many}");
        assert!(
            many.contains(r#"points="2.0,88.0 160.0,18.0 318.0,53.0""#),
            "{many}"
        );
    }

    #[test]
    fn points_older_than_the_hour_are_left_out() {
        let svg = svg(&[(0, 90.0), (4000, 1.0), (7600, 1.0)], &opts());
        assert!(svg.contains(r#"points="2.0,18.0 318.0,18.0""#), "{svg}");
        assert!(svg.contains(">1.0 %</text>"), "{svg}");
    }

    #[test]
    fn labels_are_escaped() {
        let mut o = opts();
        o.label = r#"<b>"CPU" & co</b>"#.into();
        let svg = svg(&[], &o);
        assert!(
            svg.contains("&lt;b&gt;&quot;CPU&quot; &amp; co&lt;/b&gt;"),
            "{svg}"
        );
        assert!(!svg.contains("<b>"));
    }

    #[test]
    fn rates_survive_a_counter_reset() {
        let h = [
            sample(0, 10.0, 0, 0),
            sample(10, 15.0, 1000, 0),
            // A new QEMU: CPU starts again from zero.
            sample(20, 2.0, 3000, 0),
            // Same time twice (a clock hiccup): skipped.
            sample(20, 2.0, 3000, 0),
        ];
        assert_eq!(rates(&h, |s| s.cpu_seconds), vec![(10, 0.5), (20, 0.2)]);
        assert_eq!(
            rates(&h, |s| s.net_rx_bytes as f64),
            vec![(10, 100.0), (20, 200.0)]
        );
        assert!(rates(&h[..1], |s| s.cpu_seconds).is_empty());
    }

    #[test]
    fn hour_charts_draw_cpu_and_both_directions_of_network() {
        let h: Vec<Sample> = (0..5)
            .map(|i| sample(i * 15, i as f64 * 1.5, i as u64 * 30_000, i as u64 * 15_000))
            .collect();
        let charts = hour_charts(&h, &ChartLabels::english());
        assert!(
            charts
                .cpu_svg
                .contains(r#"aria-label="CPU (% of one core), last hour: now 10 %""#),
            "{}",
            charts.cpu_svg
        );
        assert!(
            charts
                .net_svg
                .contains(r#"aria-label="Network, last hour: now in 2.0 kB/s, out 1.0 kB/s""#),
            "{}",
            charts.net_svg
        );
        assert_eq!(charts.net_svg.matches("<polyline").count(), 2);
        assert!(charts.net_svg.contains(r#"stroke-dasharray="5 3""#));
        assert!(
            charts.net_svg.contains(r##"<tspan fill="#1a7f37">— in</tspan>"##),
            "{}",
            charts.net_svg
        );

        // One sample has no rate yet; none has nothing at all.
        for h in [&h[..1], &[][..]] {
            let charts = hour_charts(h, &ChartLabels::korean());
            assert!(
                charts.cpu_svg.contains("아직 데이터가 없습니다"),
                "{}",
                charts.cpu_svg
            );
            assert!(charts.net_svg.contains(r#"role="img""#));
        }
    }

    #[test]
    fn units_read_naturally() {
        assert_eq!(Unit::BytesPerSecond.format(0.0), "0 B/s");
        assert_eq!(Unit::BytesPerSecond.format(1234.0), "1.2 kB/s");
        assert_eq!(Unit::BytesPerSecond.format(56_000_000.0), "56 MB/s");
        assert_eq!(Unit::PercentOfCore.format(3.04), "3.0 %");
        assert_eq!(Unit::PercentOfCore.format(120.0), "120 %");
        assert_eq!(nice_ceiling(3.0), 5.0);
        assert_eq!(nice_ceiling(5.0), 5.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(101.0), 200.0);
    }
}
