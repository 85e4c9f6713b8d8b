//! Bar-chart figures for benchmark results, rendered as a standalone SVG string.
//!
//! The SVG is written by hand rather than with a plotting crate: plotters and friends lay out text with
//! system fonts, which CI machines lack. Here every label is an SVG `<text font-family="sans-serif">`, so
//! the viewer (a browser, GitHub's image view) picks the font and the producer needs none.

use std::fmt::Write;

/// One cluster of bars: one link (e.g. "50 Mbps / 40 ms"), one bar per mode.
pub struct BarGroup {
    pub label: String,
    /// (mode name, value); a NaN or infinite value leaves the mode's slot empty.
    pub bars: Vec<(String, f64)>,
}

/// One chart: a title, a y-axis unit label, and groups.
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub groups: Vec<BarGroup>,
}

/// Okabe-Ito colour-blind-safe palette, most distinct first (yellow last: weak on white).
const PALETTE: [&str; 8] = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442"];
const PANEL_W: f64 = 520.0;
const PANEL_H: f64 = 320.0;
const COLUMNS: usize = 2;
/// Plot-area margins inside a panel: left (tick labels, unit), right, top (panel title), bottom (group labels).
const MARGIN: (f64, f64, f64, f64) = (64.0, 16.0, 36.0, 44.0);
const TITLE_H: f64 = 40.0;
const LEGEND_ROW_H: f64 = 22.0;

/// Renders panels stacked in a grid (2 columns) under a figure title, with one shared legend that maps
/// each mode name to a colour (same colour for the same mode in every panel). Returns SVG text.
pub fn render_svg(title: &str, panels: &[Panel]) -> String {
    let modes = modes_in_order(panels);
    let columns = panels.len().clamp(1, COLUMNS);
    let width = columns as f64 * PANEL_W;
    let (legend, legend_h) = legend(&modes, width);
    let rows = panels.len().div_ceil(COLUMNS);
    let height = TITLE_H + legend_h + rows as f64 * PANEL_H;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" \
         font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    );
    svg += &text(width / 2.0, 26.0, 18.0, "middle", "bold", title);
    svg += &legend;
    for (i, panel) in panels.iter().enumerate() {
        let x = (i % COLUMNS) as f64 * PANEL_W;
        let y = TITLE_H + legend_h + (i / COLUMNS) as f64 * PANEL_H;
        svg += &render_panel(panel, &modes, x, y);
    }
    svg += "</svg>\n";
    svg
}

/// Every mode name, in order of first appearance across all panels; a mode's index picks its colour.
fn modes_in_order(panels: &[Panel]) -> Vec<&str> {
    let mut modes: Vec<&str> = Vec::new();
    for (mode, _) in panels.iter().flat_map(|p| &p.groups).flat_map(|g| &g.bars) {
        if !modes.contains(&mode.as_str()) {
            modes.push(mode);
        }
    }
    modes
}

fn colour(modes: &[&str], mode: &str) -> &'static str {
    let index = modes.iter().position(|m| *m == mode).unwrap_or(0);
    PALETTE[index % PALETTE.len()]
}

/// The legend (a swatch and a name per mode, wrapped into rows that fit `width`) and its height.
fn legend(modes: &[&str], width: f64) -> (String, f64) {
    let item_w = |m: &str| 14.0 + 7.0 * m.chars().count() as f64 + 20.0;
    let mut rows: Vec<Vec<&str>> = Vec::new();
    let mut row_w = f64::INFINITY;
    for &mode in modes {
        if row_w + item_w(mode) > width - 20.0 {
            rows.push(Vec::new());
            row_w = 0.0;
        }
        row_w += item_w(mode);
        if let Some(row) = rows.last_mut() {
            row.push(mode);
        }
    }
    let mut out = String::new();
    for (r, row) in rows.iter().enumerate() {
        let mut x = (width - row.iter().map(|m| item_w(m)).sum::<f64>()) / 2.0;
        let y = TITLE_H + r as f64 * LEGEND_ROW_H;
        for mode in row {
            let _ = writeln!(out, "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/>", y + 2.0, colour(modes, mode));
            out += &text(x + 17.0, y + 12.5, 12.0, "start", "normal", mode);
            x += item_w(mode);
        }
    }
    let height = if modes.is_empty() { 0.0 } else { rows.len() as f64 * LEGEND_ROW_H + 8.0 };
    (out, height)
}

/// One panel with its top-left corner at (`x0`, `y0`): title, axis, grid, and clustered bars.
fn render_panel(panel: &Panel, modes: &[&str], x0: f64, y0: f64) -> String {
    let (left, right, top, bottom) = (x0 + MARGIN.0, x0 + PANEL_W - MARGIN.1, y0 + MARGIN.2, y0 + PANEL_H - MARGIN.3);
    let plot_h = bottom - top;
    let max = panel.groups.iter().flat_map(|g| &g.bars).map(|b| b.1).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let ticks = nice_ticks(max);
    let axis_top = ticks.last().copied().unwrap_or(1.0);
    let mut out = text(x0 + PANEL_W / 2.0, y0 + 22.0, 14.0, "middle", "bold", &panel.title);
    for &tick in &ticks {
        let y = bottom - bar_height(tick, axis_top, plot_h);
        let _ =
            writeln!(out, "<line x1=\"{left:.1}\" y1=\"{y:.1}\" x2=\"{right:.1}\" y2=\"{y:.1}\" stroke=\"#dddddd\" stroke-width=\"1\"/>");
        out += &text(left - 6.0, y + 4.0, 11.0, "end", "normal", &format_value(tick));
    }
    let _ = writeln!(out, "<line x1=\"{left:.1}\" y1=\"{top:.1}\" x2=\"{left:.1}\" y2=\"{bottom:.1}\" stroke=\"#333333\"/>");
    let _ = writeln!(out, "<line x1=\"{left:.1}\" y1=\"{bottom:.1}\" x2=\"{right:.1}\" y2=\"{bottom:.1}\" stroke=\"#333333\"/>");
    let (ux, uy) = (x0 + 16.0, (top + bottom) / 2.0);
    let _ = write!(out, "<g transform=\"rotate(-90 {ux:.1} {uy:.1})\">");
    out += &text(ux, uy, 12.0, "middle", "normal", &panel.unit);
    out += "</g>\n";
    // One slot per mode this panel uses, in legend order, so a missing bar leaves a gap rather than shifting the others.
    let slots: Vec<&str> = modes.iter().copied().filter(|m| panel.groups.iter().flat_map(|g| &g.bars).any(|b| b.0 == *m)).collect();
    let group_w = (right - left) / panel.groups.len().max(1) as f64;
    let bar_w = (group_w * 0.8 / slots.len().max(1) as f64).min(48.0);
    // Value labels as large as fits over a bar (sans-serif digits are about 0.65 em wide).
    let widest = panel.groups.iter().flat_map(|g| &g.bars).map(|b| format_value(b.1).len()).max().unwrap_or(1).max(1);
    let font = (bar_w * 0.95 / (0.65 * widest as f64)).clamp(7.0, 11.0);
    for (g, group) in panel.groups.iter().enumerate() {
        let centre = left + group_w * (g as f64 + 0.5);
        let first = centre - bar_w * slots.len() as f64 / 2.0;
        for (s, mode) in slots.iter().enumerate() {
            let Some(value) = group.bars.iter().find(|b| b.0 == *mode).map(|b| b.1).filter(|v| v.is_finite()) else { continue };
            let (x, h) = (first + bar_w * s as f64, bar_height(value.max(0.0), axis_top, plot_h));
            let fill = colour(modes, mode);
            let _ = writeln!(
                out,
                "<rect class=\"bar\" x=\"{x:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{h:.2}\" fill=\"{fill}\"/>",
                bottom - h,
                bar_w * 0.9
            );
            out += &text(x + bar_w * 0.45, bottom - h - 3.0, font, "middle", "normal", &format_value(value));
        }
        out += &text(centre, bottom + 18.0, 12.0, "middle", "normal", &group.label);
    }
    out
}

/// One `<text>` element with its content escaped.
fn text(x: f64, y: f64, size: f64, anchor: &str, weight: &str, content: &str) -> String {
    format!(
        "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size:.1}\" text-anchor=\"{anchor}\" font-weight=\"{weight}\" fill=\"#222222\">{}</text>\n",
        escape(content)
    )
}

/// Height in pixels of a bar of `value` on an axis from 0 to `axis_top` drawn `plot_h` pixels tall.
fn bar_height(value: f64, axis_top: f64, plot_h: f64) -> f64 {
    if axis_top > 0.0 {
        value / axis_top * plot_h
    } else {
        0.0
    }
}

/// Axis ticks from 0 covering `max`: 4 to 6 values, evenly spaced by 1, 2 or 5 x 10^k.
/// A zero, negative or non-finite `max` gives the axis for 0..1.
fn nice_ticks(max: f64) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
    let magnitude = 10f64.powf((max / 5.0).log10().floor());
    // The smallest step that needs at most 5 intervals; the 1-2-5 ladder then guarantees at least 3.
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|step| max / step <= 5.0 + 1e-9).unwrap_or(10.0 * magnitude);
    let intervals = ((max / step) - 1e-9).ceil().max(1.0) as usize;
    (0..=intervals).map(|i| i as f64 * step).collect()
}

/// A value rounded for a label: 3 significant digits, and whole numbers from 100 up (812, 1234, 3.4, 0.0512).
fn format_value(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return if value == 0.0 { "0".to_string() } else { String::new() };
    }
    let decimals = (2 - value.abs().log10().floor() as i32).clamp(0, 12) as usize;
    let s = format!("{value:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Escapes the characters that are special in XML text and attribute values.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panel(title: &str, groups: &[(&str, &[(&str, f64)])]) -> Panel {
        let groups = groups
            .iter()
            .map(|(label, bars)| BarGroup { label: label.to_string(), bars: bars.iter().map(|(m, v)| (m.to_string(), *v)).collect() })
            .collect();
        Panel { title: title.to_string(), unit: "ms".to_string(), groups }
    }

    /// Checks that every tag is closed in order, and that `&` only starts an entity.
    fn assert_well_formed(svg: &str) {
        let mut stack: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').map(|e| start + e).expect("unterminated tag");
            let tag = &rest[start + 1..end];
            assert!(!rest[..start].contains('>'), "stray '>' in text");
            let name = tag.trim_start_matches('/').split_whitespace().next().expect("empty tag");
            if tag.starts_with('/') {
                assert_eq!(stack.pop(), Some(name), "mismatched </{name}>");
            } else if !tag.ends_with('/') {
                stack.push(name);
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed tags: {stack:?}");
        for (i, _) in svg.match_indices('&') {
            let entity = &svg[i..svg[i..].find(';').map_or(svg.len(), |e| i + e + 1)];
            assert!(["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&entity), "bad entity at {i}");
        }
    }

    /// The `height` attribute of every bar, in the order drawn.
    fn bar_heights(svg: &str) -> Vec<f64> {
        svg.lines()
            .filter(|l| l.starts_with("<rect class=\"bar\""))
            .filter_map(|l| l.split(" height=\"").nth(1)?.split('"').next()?.parse().ok())
            .collect()
    }

    #[test]
    fn nice_ticks_are_4_to_6_steps_of_1_2_5_from_zero() {
        for max in [0.003, 0.07, 0.5, 1.0, 3.3, 7.0, 9.99, 10.0, 12.0, 26.0, 99.0, 101.0, 812.0, 1234.0, 55555.0, 3.7e9] {
            let ticks = nice_ticks(max);
            assert!((4..=6).contains(&ticks.len()), "{max}: {ticks:?}");
            assert_eq!(ticks[0], 0.0);
            assert!(ticks[ticks.len() - 1] >= max * (1.0 - 1e-9), "{max}: {ticks:?}");
            let step = ticks[1];
            let mantissa = step / 10f64.powf(step.log10().floor());
            assert!([1.0, 2.0, 5.0].iter().any(|m| (m - mantissa).abs() < 1e-6), "{max}: step {step}");
        }
        assert_eq!(nice_ticks(10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(nice_ticks(812.0), vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
    }

    #[test]
    fn nice_ticks_survive_zero_and_non_finite_max() {
        for max in [0.0, -5.0, f64::NAN, f64::INFINITY] {
            assert_eq!(nice_ticks(max), nice_ticks(1.0));
        }
    }

    #[test]
    fn values_are_rounded_to_three_significant_digits() {
        let cases = [(812.4, "812"), (1234.0, "1234"), (3.4, "3.4"), (3.456, "3.46"), (0.05123, "0.0512"), (99.96, "100"), (0.0, "0")];
        for (value, want) in cases {
            assert_eq!(format_value(value), want);
        }
        assert_eq!(format_value(0.1 + 0.2), "0.3");
    }

    #[test]
    fn escape_replaces_xml_specials() {
        assert_eq!(escape(r#"a & b < c > "d" 'e'"#), "a &amp; b &lt; c &gt; &quot;d&quot; &apos;e&apos;");
        assert_eq!(escape("50 Mbps / 40 ms"), "50 Mbps / 40 ms");
    }

    #[test]
    fn output_is_well_formed_and_escaped() {
        let p = panel("TTFT <short> & \"quoted\"", &[("a&b", &[("m<1>", 3.0), ("m2", f64::NAN)]), ("c", &[("m2", 5.0)])]);
        let svg = render_svg("R&D <figure>", &[p]);
        assert_well_formed(&svg);
        assert!(svg.contains("R&amp;D &lt;figure&gt;") && svg.contains("m&lt;1&gt;"));
    }

    #[test]
    fn bars_scale_linearly_with_value() {
        let svg = render_svg("t", &[panel("p", &[("g", &[("a", 10.0), ("b", 20.0), ("c", 5.0)])])]);
        let h = bar_heights(&svg);
        assert_eq!(h.len(), 3);
        assert!((h[1] - 2.0 * h[0]).abs() < 0.02 && (h[0] - 2.0 * h[2]).abs() < 0.02, "{h:?}");
        assert_eq!(bar_height(4.0, 8.0, 200.0), 100.0);
        assert_eq!(bar_height(4.0, 0.0, 200.0), 0.0);
    }

    #[test]
    fn modes_keep_their_colour_and_missing_bars_keep_their_slot() {
        let first = panel("1", &[("g", &[("cloud", 1.0), ("hat", 2.0)])]);
        let second = panel("2", &[("g", &[("hat", 2.0), ("cloud", f64::NAN)]), ("h", &[("cloud", 1.0), ("hat", 2.0)])]);
        assert_eq!(modes_in_order(&[first, second]), vec!["cloud", "hat"]);
        let svg = render_svg("t", &[panel("p", &[("g", &[("cloud", 1.0), ("hat", 2.0)]), ("h", &[("hat", 2.0)])])]);
        let hat: Vec<&str> = svg.lines().filter(|l| l.contains("class=\"bar\"") && l.contains(PALETTE[1])).collect();
        assert_eq!(hat.len(), 2);
    }

    #[test]
    fn empty_zero_and_single_bar_inputs_do_not_panic() {
        let cases = vec![
            vec![],
            vec![panel("empty", &[])],
            vec![panel("zeros", &[("g", &[("a", 0.0), ("b", 0.0)])])],
            vec![panel("one", &[("g", &[("a", 42.0)])])],
            vec![panel("nan", &[("g", &[("a", f64::NAN), ("b", f64::INFINITY)])])],
        ];
        for panels in cases {
            let svg = render_svg("", &panels);
            assert_well_formed(&svg);
            assert!(!svg.contains("NaN") && !svg.contains("inf"));
        }
    }
}
