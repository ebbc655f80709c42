//! SVG charts of the planner's and the simulator's reports.
//!
//! Hand-written SVG 1.1: no scripts, no external fonts, images or style sheets, so a file opens
//! the same in a browser, an image viewer or `rsvg-convert`. Colours come from the Okabe–Ito
//! palette, which stays distinguishable with the common colour-vision deficiencies; series also
//! differ by dash pattern where colour alone would carry the meaning. Every text that came from
//! the user (instance types, subnet names, warnings quoting them) is escaped. The output depends
//! only on the report: the same report gives byte-identical SVG.
//!
//! Bars carry `<title>` tooltips with the exact numbers, so hovering in a browser shows them.
//! Long timelines are thinned to at most [`MAX_POINTS`] points per series, keeping each
//! stretch's lowest and highest sample so peaks survive.

use std::fmt::Write as _;

use crate::exact::ExactReport;
use crate::node::CapacityError;
use crate::policy::Flavour;
use crate::timeline::{Sample, TimelineReport};
use crate::workbook::{Rows, Sheet, WorkbookReport};

/// Most points drawn for one timeline series; longer timelines are thinned.
pub const MAX_POINTS: usize = 600;

const WIDTH: f64 = 960.0;
const PAD: f64 = 28.0;
const FONT_FAMILY: &str =
    "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, 'DejaVu Sans', sans-serif";
const HATCH_ID: &str = "subnet-calc-hatch";

/// Okabe–Ito colours plus neutral greys.
mod colour {
    pub(super) const BLUE: &str = "#0072B2";
    pub(super) const SKY: &str = "#56B4E9";
    pub(super) const ORANGE: &str = "#E69F00";
    pub(super) const GREEN: &str = "#009E73";
    pub(super) const VERMILLION: &str = "#D55E00";
    pub(super) const PURPLE: &str = "#CC79A7";
    pub(super) const BLACK: &str = "#000000";
    /// ENI primary addresses: overhead, so neutral.
    pub(super) const PRIMARY: &str = "#8A939E";
    /// A subnet's used addresses.
    pub(super) const SLATE: &str = "#3E4C59";
    pub(super) const INK: &str = "#1F2933";
    pub(super) const MUTED: &str = "#52606D";
    pub(super) const FAINT: &str = "#9AA5B1";
    pub(super) const GRID: &str = "#E4E7EB";
    pub(super) const FREE: &str = "#EEF1F4";
    pub(super) const WHITE: &str = "#FFFFFF";
    /// Series colours in order (vermillion is kept for alarms).
    pub(super) const SERIES: [&str; 6] = [BLUE, ORANGE, GREEN, PURPLE, SKY, BLACK];
}

use colour::*;

// ---------------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------------

/// Escapes text for XML content and attribute values, and replaces characters XML 1.0 does not
/// allow at all (most control characters) with U+FFFD.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A coordinate with at most one decimal, no `-0`, `0` for anything not finite.
fn num(v: f64) -> String {
    if !v.is_finite() {
        return "0".into();
    }
    let r = (v * 10.0).round() / 10.0;
    if r == 0.0 {
        "0".into()
    } else if r.fract() == 0.0 {
        format!("{}", r as i64)
    } else {
        format!("{r:.1}")
    }
}

/// `1234567` as `1,234,567`.
fn int(v: u64) -> String {
    let digits = v.to_string();
    let mut rev = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().rev().enumerate() {
        if i > 0 && i % 3 == 0 {
            rev.push(',');
        }
        rev.push(ch);
    }
    rev.chars().rev().collect()
}

/// A signed count with a true minus sign.
fn signed(v: i64) -> String {
    if v < 0 {
        format!("\u{2212}{}", int(v.unsigned_abs()))
    } else {
        int(v.unsigned_abs())
    }
}

/// Axis numbers: `950`, `1,500`, `12k`, `2.5M`.
fn compact(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        return int(v.max(0.0).round() as u64);
    };
    let s = if (x * 10.0).round().fract() == 0.0 && ((x * 10.0).round() / 10.0).fract() != 0.0 {
        format!("{x:.1}")
    } else {
        format!("{}", x.round() as i64)
    };
    format!("{s}{suffix}")
}

/// Seconds as `0`, `45s`, `5m`, `1h30m`, `2d6h` (the two largest units).
fn dur(secs: u64) -> String {
    if secs == 0 {
        return "0".into();
    }
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
    ];
    let first = parts.iter().position(|p| p.0 > 0).unwrap_or(3);
    parts[first..]
        .iter()
        .take(2)
        .filter(|p| p.0 > 0)
        .map(|(n, u)| format!("{n}{u}"))
        .collect()
}

/// `at 1h05m`, or `at the start`.
fn at_time(secs: u64) -> String {
    if secs == 0 {
        "at the start".into()
    } else {
        format!("at {}", dur(secs))
    }
}

fn policy_name(f: Flavour) -> &'static str {
    f.name()
}

fn capacity_error_name(e: CapacityError) -> &'static str {
    match e {
        CapacityError::NoAddresses => "InsufficientFreeAddressesInSubnet",
        CapacityError::NoCidrBlocks => "InsufficientCidrBlocks",
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{} {}", int(n), if n == 1 { one } else { many })
}

/// Estimated rendered width of `s` at `size` px (DejaVu Sans metrics, the widest common
/// fallback, so estimates err on the roomy side).
fn text_w(s: &str, size: f64) -> f64 {
    s.chars()
        .map(|c| match c {
            'i' | 'j' | 'l' | '.' | ',' | ':' | ';' | '\'' | '|' | '!' => 0.30,
            ' ' | 'f' | 't' | 'r' | '(' | ')' | '[' | ']' | '/' | '-' => 0.38,
            'm' | 'w' | 'M' | 'W' | '@' | '%' => 0.92,
            'A'..='Z' => 0.70,
            '0'..='9' => 0.64,
            '\u{00b7}' => 0.32,
            c if c.is_ascii() => 0.60,
            _ => 0.80,
        })
        .sum::<f64>()
        * size
}

/// Estimated width of `s` in font `f` (bold runs about 10% wider).
fn font_w(s: &str, f: Font) -> f64 {
    text_w(s, f.size) * if f.bold { 1.1 } else { 1.0 }
}

/// Shortens `s` to at most `max` characters with an ellipsis.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('\u{2026}');
        t
    }
}

/// Breaks `text` into lines no wider than `width`, preferring breaks at ` · ` separators, then
/// at spaces; a single overlong word is cut.
fn wrap(text: &str, width: f64, size: f64) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    let fits = |s: &str| text_w(s, size) <= width;
    for part in text.split(" \u{00b7} ") {
        let candidate = if cur.is_empty() {
            part.to_owned()
        } else {
            format!("{cur} \u{00b7} {part}")
        };
        if fits(&candidate) {
            cur = candidate;
            continue;
        }
        if !cur.is_empty() {
            lines.push(std::mem::take(&mut cur));
        }
        for word in part.split(' ') {
            let candidate = if cur.is_empty() {
                word.to_owned()
            } else {
                format!("{cur} {word}")
            };
            if fits(&candidate) {
                cur = candidate;
            } else {
                if !cur.is_empty() {
                    lines.push(std::mem::take(&mut cur));
                }
                let max = ((width / (size * 0.62)).floor() as usize).max(4);
                cur = truncate(word, max);
            }
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

// ---------------------------------------------------------------------------------------------
// Scales
// ---------------------------------------------------------------------------------------------

/// A whole-number axis from 0: the top (at least `max`) and the step, about `target` steps of
/// 1, 2, 2.5 or 5 times a power of ten.
fn nice_axis(max: f64, target: usize) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let mults: &[f64] = if mag < 10.0 {
        &[1.0, 2.0, 5.0, 10.0]
    } else {
        &[1.0, 2.0, 2.5, 5.0, 10.0]
    };
    let step = mults
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
        .max(1.0);
    ((max / step).ceil() * step, step)
}

fn ticks(top: f64, step: f64) -> Vec<f64> {
    let n = (top / step).round() as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// Time ticks over `[0, end]` seconds at a step people read easily, at most about 8.
fn time_ticks(end: f64) -> Vec<f64> {
    const STEPS: [u64; 22] = [
        1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10_800, 14_400,
        21_600, 43_200, 86_400, 172_800, 604_800,
    ];
    let end = end.max(1.0);
    let step = STEPS
        .iter()
        .map(|s| *s as f64)
        .find(|s| end / s <= 8.0)
        .unwrap_or_else(|| nice_axis(end / 86_400.0, 8).1 * 86_400.0);
    let n = (end / step).floor() as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

// ---------------------------------------------------------------------------------------------
// The SVG writer
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Anchor {
    Start,
    Middle,
    End,
}

#[derive(Clone, Copy)]
struct Font {
    size: f64,
    bold: bool,
    fill: &'static str,
    anchor: Anchor,
}

impl Font {
    const fn new(size: f64, fill: &'static str) -> Self {
        Self {
            size,
            bold: false,
            fill,
            anchor: Anchor::Start,
        }
    }
    const fn bold(mut self) -> Self {
        self.bold = true;
        self
    }
    const fn fill(mut self, fill: &'static str) -> Self {
        self.fill = fill;
        self
    }
    const fn end(mut self) -> Self {
        self.anchor = Anchor::End;
        self
    }
    const fn middle(mut self) -> Self {
        self.anchor = Anchor::Middle;
        self
    }
}

const TITLE: Font = Font::new(20.0, INK).bold();
const SUBTITLE: Font = Font::new(13.0, MUTED);
const HEAD: Font = Font::new(14.0, INK).bold();
const LABEL: Font = Font::new(12.5, INK).bold();
const SMALL: Font = Font::new(11.5, MUTED);
const TICK: Font = Font::new(11.0, MUTED);
const VALUE: Font = Font::new(11.0, INK);

/// A box.
#[derive(Clone, Copy)]
struct Bx {
    x: f64,
    y: f64,
    w: f64,
    h: f64,
}

#[derive(Default)]
struct Svg {
    body: String,
}

impl Svg {
    fn rect(&mut self, b: Bx, fill: &str, attrs: &str, tip: Option<&str>) {
        let _ = write!(
            self.body,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{fill}"{}{attrs}"#,
            num(b.x),
            num(b.y),
            num(b.w.max(0.0)),
            num(b.h.max(0.0)),
            if attrs.is_empty() { "" } else { " " },
        );
        match tip {
            Some(t) => {
                let _ = writeln!(self.body, "><title>{}</title></rect>", esc(t));
            }
            None => self.body.push_str("/>\n"),
        }
    }

    fn text(&mut self, x: f64, y: f64, s: &str, f: Font) {
        self.text_with(x, y, s, f, "");
    }

    fn text_with(&mut self, x: f64, y: f64, s: &str, f: Font, attrs: &str) {
        let anchor = match f.anchor {
            Anchor::Start => "",
            Anchor::Middle => r#" text-anchor="middle""#,
            Anchor::End => r#" text-anchor="end""#,
        };
        let weight = if f.bold { r#" font-weight="bold""# } else { "" };
        let _ = writeln!(
            self.body,
            r#"<text x="{}" y="{}" font-size="{}" fill="{}"{anchor}{weight}{}{attrs}>{}</text>"#,
            num(x),
            num(y),
            num(f.size),
            f.fill,
            if attrs.is_empty() { "" } else { " " },
            esc(s),
        );
    }

    fn line(&mut self, from: (f64, f64), to: (f64, f64), stroke: &str, attrs: &str) {
        let _ = writeln!(
            self.body,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{stroke}"{}{attrs}/>"#,
            num(from.0),
            num(from.1),
            num(to.0),
            num(to.1),
            if attrs.is_empty() { "" } else { " " },
        );
    }

    fn path(&mut self, d: &str, attrs: &str) {
        let _ = writeln!(self.body, r#"<path d="{d}" {attrs}/>"#);
    }

    fn open(&mut self, attrs: &str) {
        let _ = writeln!(self.body, "<g {attrs}>");
    }

    fn close(&mut self) {
        self.body.push_str("</g>\n");
    }

    fn finish(self, height: f64, title: &str, desc: &str) -> String {
        let (w, h) = (num(WIDTH), num(height.ceil()));
        let mut out = String::with_capacity(self.body.len() + 1024);
        let _ = write!(
            out,
            r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" font-family="{FONT_FAMILY}" font-size="12">
<title>{}</title>
<desc>{}</desc>
<defs><pattern id="{HATCH_ID}" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#FBE6D9"/><line x1="0" y1="0" x2="0" y2="6" stroke="{VERMILLION}" stroke-width="2.4"/></pattern></defs>
<rect width="{w}" height="{h}" fill="{WHITE}"/>
"##,
            esc(title),
            esc(desc),
        );
        out.push_str(&self.body);
        out.push_str("</svg>\n");
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Shared pieces: header, legend, sections, notes
// ---------------------------------------------------------------------------------------------

/// Title and wrapped subtitle lines; returns the y where content may start.
fn header(s: &mut Svg, title: &str, subtitles: &[String]) -> f64 {
    let mut y = PAD + 16.0;
    for (i, line) in wrap(title, WIDTH - 2.0 * PAD, TITLE.size)
        .iter()
        .enumerate()
    {
        if i > 0 {
            y += 24.0;
        }
        s.text(PAD, y, line, TITLE);
    }
    y += 4.0;
    for sub in subtitles {
        for line in wrap(sub, WIDTH - 2.0 * PAD, SUBTITLE.size) {
            y += 18.0;
            s.text(PAD, y, &line, SUBTITLE);
        }
    }
    y + 16.0
}

#[derive(Clone, Copy)]
enum Key<'a> {
    /// A filled square.
    Swatch(&'a str),
    /// The hatch pattern (missing / short).
    Hatch,
    /// A line, optionally dashed.
    Line(&'a str, Option<&'a str>),
}

/// Lays legend entries out left to right from `x`, wrapping before `right`. `y` is the first
/// row's baseline; returns the baseline after the last row.
fn legend(s: &mut Svg, x: f64, y: f64, right: f64, items: &[(Key<'_>, String)]) -> f64 {
    let font = Font::new(12.0, INK);
    let mut cx = x;
    let mut y = y;
    s.open(r#"class="legend""#);
    for (key, label) in items {
        let w = 18.0 + text_w(label, font.size) + 16.0;
        if cx > x && cx + w > right {
            cx = x;
            y += 19.0;
        }
        let sw = Bx {
            x: cx,
            y: y - 10.0,
            w: 12.0,
            h: 12.0,
        };
        match key {
            Key::Swatch(c) => s.rect(sw, c, r#"rx="2""#, None),
            Key::Hatch => s.rect(
                sw,
                &format!("url(#{HATCH_ID})"),
                &format!(r#"stroke="{VERMILLION}" stroke-width="1""#),
                None,
            ),
            Key::Line(c, dash) => {
                let d = dash
                    .map(|d| format!(r#" stroke-dasharray="{d}""#))
                    .unwrap_or_default();
                s.line(
                    (cx - 1.0, y - 4.0),
                    (cx + 13.0, y - 4.0),
                    c,
                    &format!(r#"stroke-width="2.5"{d}"#),
                );
            }
        }
        s.text(cx + 18.0, y, label, font);
        cx += w;
    }
    s.close();
    y + 19.0
}

/// A section heading with an optional note after it; returns the y below it.
fn section(s: &mut Svg, y: f64, title: &str, note: &str) -> f64 {
    s.text(PAD, y + 14.0, title, HEAD);
    if !note.is_empty() {
        let x = PAD + font_w(title, HEAD) + 12.0;
        let room = WIDTH - PAD - x;
        let line = wrap(note, room, SMALL.size)
            .into_iter()
            .next()
            .unwrap_or_default();
        s.text(x, y + 14.0, &line, SMALL);
    }
    s.line(
        (PAD, y + 22.0),
        (WIDTH - PAD, y + 22.0),
        GRID,
        r#"stroke-width="1""#,
    );
    y + 34.0
}

/// A bulleted list of notes (warnings), at most `max_lines` lines.
fn notes(s: &mut Svg, y: f64, title: &str, items: &[String], max_lines: usize) -> f64 {
    if items.is_empty() {
        return y;
    }
    let mut y = section(s, y, title, "");
    let mut lines = 0;
    s.open(r#"class="notes""#);
    for (i, item) in items.iter().enumerate() {
        let wrapped = wrap(item, WIDTH - 2.0 * PAD - 18.0, SMALL.size);
        if lines + wrapped.len() > max_lines {
            s.text(
                PAD,
                y + 4.0,
                &format!("\u{2026} and {} more", items.len() - i),
                SMALL,
            );
            y += 18.0;
            break;
        }
        s.text(PAD + 2.0, y + 4.0, "\u{25b8}", SMALL.fill(VERMILLION));
        for line in wrapped {
            s.text(PAD + 18.0, y + 4.0, &line, SMALL.fill(INK));
            y += 17.0;
            lines += 1;
        }
    }
    s.close();
    y + 6.0
}

fn empty_note(s: &mut Svg, y: f64, what: &str) -> f64 {
    s.rect(
        Bx {
            x: PAD,
            y,
            w: WIDTH - 2.0 * PAD,
            h: 44.0,
        },
        FREE,
        r#"rx="4" class="empty""#,
        None,
    );
    s.text(WIDTH / 2.0, y + 27.0, what, SMALL.middle());
    y + 60.0
}

// ---------------------------------------------------------------------------------------------
// Horizontal bar rows
// ---------------------------------------------------------------------------------------------

struct Seg {
    value: f64,
    fill: &'static str,
    text: &'static str,
    class: &'static str,
    hatch: bool,
    tip: String,
}

impl Seg {
    fn solid(value: f64, fill: &'static str, text: &'static str, class: &'static str) -> Self {
        Self {
            value,
            fill,
            text,
            class,
            hatch: false,
            tip: String::new(),
        }
    }
    fn tip(mut self, tip: String) -> Self {
        self.tip = tip;
        self
    }
}

struct Bar {
    segs: Vec<Seg>,
    /// Text right of the bar.
    end: String,
}

struct Row {
    label: String,
    sub: String,
    bars: Vec<Bar>,
    /// An alert right of the last bar's end text.
    alert: Option<String>,
}

/// Rows of stacked horizontal bars on one shared scale, with a labelled axis; returns the y below.
fn bar_rows(s: &mut Svg, y: f64, rows: &[Row], axis_label: &str) -> f64 {
    let label_w = rows
        .iter()
        .map(|r| font_w(&r.label, LABEL).max(font_w(&r.sub, SMALL)))
        .fold(140.0, f64::max)
        .min(330.0);
    let reserve = rows
        .iter()
        .flat_map(|r| &r.bars)
        .map(|b| text_w(&b.end, VALUE.size) + 16.0)
        .fold(70.0, f64::max)
        .min(380.0);
    let x0 = PAD + label_w + 14.0;
    let x1 = WIDTH - PAD - reserve;
    let max = rows
        .iter()
        .flat_map(|r| &r.bars)
        .map(|b| b.segs.iter().map(|g| g.value.max(0.0)).sum::<f64>())
        .fold(0.0, f64::max);
    let (top, step) = nice_axis(max, 6);
    let scale = |v: f64| (x1 - x0) * v / top;
    let nbars = rows.iter().map(|r| r.bars.len()).max().unwrap_or(1).max(1);
    let bar_h = if nbars == 1 { 22.0 } else { 15.0 };
    let gap = 3.0;
    let block = nbars as f64 * bar_h + (nbars as f64 - 1.0) * gap;
    let pitch = block + 20.0;
    // Rows with an alert get a line for it under their bars.
    const ALERT_H: f64 = 17.0;
    let mut row_y = Vec::with_capacity(rows.len());
    let mut height = 0.0;
    for r in rows {
        row_y.push(y + height + 10.0);
        height += pitch + if r.alert.is_some() { ALERT_H } else { 0.0 };
    }
    // Grid behind the bars.
    for t in ticks(top, step) {
        let x = x0 + scale(t);
        s.line(
            (x, y - 4.0),
            (x, y + height),
            if t == 0.0 { FAINT } else { GRID },
            r#"stroke-width="1""#,
        );
        s.text(x, y + height + 15.0, &compact(t), TICK.middle());
    }
    s.text(
        (x0 + x1) / 2.0,
        y + height + 32.0,
        axis_label,
        SMALL.middle(),
    );
    for (i, r) in rows.iter().enumerate() {
        let ry = row_y[i];
        let mid = ry + block / 2.0;
        s.open(&format!(r#"class="bar-row" data-row="{i}""#));
        s.text(x0 - 14.0, mid - 2.0, &r.label, LABEL.end());
        s.text(x0 - 14.0, mid + 13.0, &r.sub, SMALL.end());
        for (bi, b) in r.bars.iter().enumerate() {
            let by = ry + bi as f64 * (bar_h + gap);
            let mut x = x0;
            for g in &b.segs {
                let w = scale(g.value.max(0.0));
                if w <= 0.0 {
                    continue;
                }
                let bx = Bx {
                    x,
                    y: by,
                    w,
                    h: bar_h,
                };
                let tip = (!g.tip.is_empty()).then_some(g.tip.as_str());
                if g.hatch {
                    s.rect(
                        bx,
                        &format!("url(#{HATCH_ID})"),
                        &format!(
                            r#"class="seg {}" stroke="{VERMILLION}" stroke-width="1""#,
                            g.class
                        ),
                        tip,
                    );
                } else {
                    s.rect(
                        bx,
                        g.fill,
                        &format!(
                            r#"class="seg {}" stroke="{WHITE}" stroke-width="1""#,
                            g.class
                        ),
                        tip,
                    );
                }
                let label = int(g.value.round() as u64);
                if !g.hatch && w >= text_w(&label, VALUE.size) + 8.0 {
                    s.text(
                        x + w / 2.0,
                        by + bar_h / 2.0 + 4.0,
                        &label,
                        VALUE.fill(g.text).middle(),
                    );
                }
                x += w;
            }
            s.text(x + 6.0, by + bar_h / 2.0 + 4.0, &b.end, VALUE);
        }
        if let Some(a) = &r.alert {
            let room = WIDTH - PAD - x0;
            let line = wrap(a, room, VALUE.size * 1.1)
                .into_iter()
                .next()
                .unwrap_or_default();
            s.text_with(
                x0,
                ry + block + 14.0,
                &line,
                VALUE.fill(VERMILLION).bold(),
                r#"class="alert""#,
            );
        }
        s.close();
    }
    y + height + 44.0
}

// ---------------------------------------------------------------------------------------------
// Subnet fill bars
// ---------------------------------------------------------------------------------------------

struct Fill {
    label: String,
    sub: String,
    /// Usable (or available) addresses.
    capacity: u64,
    /// Addresses taken (may exceed `capacity` in the workbook).
    used: u64,
    /// Addresses wanted at steady state (at least `used`).
    demand: u64,
    used_fill: &'static str,
    /// Text colour on `used_fill`.
    used_text: &'static str,
    /// What the capacity is called ("usable", "available").
    capacity_word: &'static str,
    /// Named parts of `used`, drawn as dividers.
    parts: Vec<(String, u64)>,
}

/// Subnet fill bars on one shared scale; returns the y below.
fn fill_bars(s: &mut Svg, y: f64, bars: &[Fill]) -> f64 {
    let label_w = bars
        .iter()
        .map(|b| font_w(&b.label, LABEL).max(font_w(&b.sub, SMALL)))
        .fold(140.0, f64::max)
        .min(330.0);
    let x0 = PAD + label_w + 14.0;
    let x1 = WIDTH - PAD - 8.0;
    let max = bars
        .iter()
        .map(|b| b.capacity.max(b.used).max(b.demand))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let scale = |v: u64| (x1 - x0) * v as f64 / max;
    let h = 26.0;
    let mut y = y + 6.0;
    for (i, b) in bars.iter().enumerate() {
        s.open(&format!(r#"class="fill" data-fill="{i}""#));
        s.text(x0 - 14.0, y + 11.0, &b.label, LABEL.end());
        s.text(x0 - 14.0, y + 26.0, &b.sub, SMALL.end());
        let cap_x = x0 + scale(b.capacity);
        s.rect(
            Bx {
                x: x0,
                y,
                w: cap_x - x0,
                h,
            },
            FREE,
            r#"class="free""#,
            Some(&format!("{} {}", int(b.capacity), b.capacity_word)),
        );
        let in_cap = b.used.min(b.capacity);
        s.rect(
            Bx {
                x: x0,
                y,
                w: scale(in_cap),
                h,
            },
            b.used_fill,
            r#"class="used""#,
            Some(&format!("{} used", int(b.used))),
        );
        if b.used > b.capacity {
            s.rect(
                Bx {
                    x: cap_x,
                    y,
                    w: scale(b.used) - scale(b.capacity),
                    h,
                },
                VERMILLION,
                r#"class="over""#,
                Some(&format!(
                    "{} more than the subnet has",
                    int(b.used - b.capacity)
                )),
            );
        }
        let short_from = b.used.max(b.capacity);
        if b.demand > short_from {
            s.rect(
                Bx {
                    x: x0 + scale(short_from),
                    y,
                    w: scale(b.demand) - scale(short_from),
                    h,
                },
                &format!("url(#{HATCH_ID})"),
                &format!(r#"class="short" stroke="{VERMILLION}" stroke-width="1""#),
                Some(&format!(
                    "{} addresses the subnet cannot give",
                    int(b.demand - short_from)
                )),
            );
        }
        // Dividers between the parts, with their names where they fit.
        let mut acc = 0u64;
        for (pi, (name, v)) in b.parts.iter().enumerate() {
            let from = x0 + scale(acc);
            acc = acc.saturating_add(*v);
            let to = x0 + scale(acc.min(b.used));
            if pi + 1 < b.parts.len() && acc < b.used {
                s.line((to, y), (to, y + h), WHITE, r#"stroke-width="2""#);
            }
            let w = to - from;
            let full = format!("{name}: {}", int(*v));
            let short = int(*v);
            let text = if w >= text_w(&full, VALUE.size) + 10.0 {
                Some(full)
            } else if w >= text_w(&short, VALUE.size) + 8.0 {
                Some(short)
            } else {
                None
            };
            if let Some(t) = text {
                s.text(
                    (from + to) / 2.0,
                    y + h / 2.0 + 4.0,
                    &t,
                    VALUE.fill(b.used_text).middle(),
                );
            }
        }
        if b.used.max(b.demand) > b.capacity {
            s.line(
                (cap_x, y - 5.0),
                (cap_x, y + h + 5.0),
                INK,
                r#"stroke-width="1.5" stroke-dasharray="3 2" class="capacity""#,
            );
            s.text(
                cap_x - 4.0,
                y - 7.0,
                &format!("{} {}", int(b.capacity), b.capacity_word),
                TICK.end(),
            );
        }
        let pct = |v: u64| {
            if b.capacity == 0 {
                "\u{2014}".to_owned()
            } else {
                format!("{}%", (v as f64 * 100.0 / b.capacity as f64).round())
            }
        };
        let (summary, alarm) = if b.used > b.capacity {
            (
                format!(
                    "{} needed of {} ({}) \u{00b7} over by {}",
                    int(b.used),
                    int(b.capacity),
                    pct(b.used),
                    int(b.used - b.capacity)
                ),
                true,
            )
        } else if b.demand > b.capacity {
            (
                format!(
                    "{} of {} used ({}) \u{00b7} the groups need {}: short by {}",
                    int(b.used),
                    int(b.capacity),
                    pct(b.used),
                    int(b.demand),
                    int(b.demand - b.capacity)
                ),
                true,
            )
        } else {
            (
                format!(
                    "{} of {} used ({}) \u{00b7} {} left",
                    int(b.used),
                    int(b.capacity),
                    pct(b.used),
                    int(b.capacity - b.used)
                ),
                false,
            )
        };
        let f = if alarm {
            SMALL.fill(VERMILLION).bold()
        } else {
            SMALL.fill(INK)
        };
        s.text(x0, y + h + 17.0, &summary, f);
        s.close();
        y += h + 17.0 + 26.0;
    }
    y
}

// ---------------------------------------------------------------------------------------------
// Exact mode
// ---------------------------------------------------------------------------------------------

/// Exact-mode chart: per node group, a stacked horizontal bar of a node's subnet addresses split
/// into assigned pod IPs, warm (unused) pod IPs and ENI primaries, with pods-without-IP flagged;
/// plus a subnet fill bar (used vs remaining of usable, red when over) and the policy name in
/// the title.
pub fn exact_chart(report: &ExactReport) -> String {
    let mut s = Svg::default();
    let sub = &report.subnet;
    let groups = &report.node_groups;
    let title = format!(
        "Subnet plan \u{00b7} exact mode \u{00b7} {} policy",
        policy_name(report.policy)
    );
    let without: u64 = groups.iter().map(|g| g.pods_without_ip_total).sum();
    let mut line = format!(
        "{} \u{00b7} {} usable \u{00b7} {} used \u{00b7} {} remaining \u{00b7} {} hosted",
        sub.cidr,
        int(u64::from(sub.usable_ips)),
        int(sub.ips_used),
        signed(sub.ips_remaining),
        plural(report.pods_hosted, "pod", "pods"),
    );
    if without > 0 {
        let _ = write!(
            line,
            " \u{00b7} {} without an IP",
            plural(without, "pod", "pods")
        );
    }
    if let Some(pc) = sub.prefix_capacity {
        let _ = write!(
            line,
            " \u{00b7} /28 prefixes still obtainable: {} (scattered) to {} (packed)",
            int(u64::from(pc.worst)),
            int(u64::from(pc.best))
        );
    }
    let mut y = header(&mut s, &title, std::slice::from_ref(&line));
    y = legend(
        &mut s,
        PAD,
        y,
        WIDTH - PAD,
        &[
            (Key::Swatch(BLUE), "pod IPs assigned to pods".into()),
            (Key::Swatch(SKY), "warm pod IPs (allocated, unused)".into()),
            (Key::Swatch(PRIMARY), "ENI primary IPs".into()),
            (Key::Hatch, "pods without an IP".into()),
        ],
    );
    y = section(
        &mut s,
        y,
        "Subnet addresses per node",
        "the steady state each node of a group reaches",
    );
    if groups.is_empty() {
        y = empty_note(&mut s, y, "No node groups in this plan.");
    } else {
        let rows: Vec<Row> =
            groups
                .iter()
                .map(|g| {
                    let assigned = g.pod_ips_per_node.saturating_sub(g.unused_pod_ips_per_node);
                    let primaries = g.subnet_ips_per_node.saturating_sub(g.pod_ips_per_node);
                    let mut sub = format!(
                        "{} pods/node \u{00b7} {}",
                        int(u64::from(g.pods_per_node)),
                        plural(u64::from(g.enis_per_node), "ENI", "ENIs")
                    );
                    if g.prefixes_per_node > 0 {
                        let _ = write!(
                            sub,
                            " \u{00b7} {}",
                            plural(u64::from(g.prefixes_per_node), "prefix", "prefixes")
                        );
                    }
                    let mut alerts = Vec::new();
                    if g.pods_without_ip_per_node > 0 {
                        alerts.push(format!(
                            "\u{26a0} {} without an IP",
                            plural(u64::from(g.pods_without_ip_per_node), "pod", "pods")
                        ));
                    }
                    let short_in_subnet = g
                        .pods_without_ip_total
                        .saturating_sub(u64::from(g.count) * u64::from(g.pods_without_ip_per_node));
                    if short_in_subnet > 0 {
                        alerts.push(format!(
                            "\u{26a0} subnet full: {} of the group get no IP",
                            plural(short_in_subnet, "pod", "pods")
                        ));
                    }
                    if g.oscillates {
                        alerts.push("\u{21bb} pool never settles".into());
                    }
                    let name = truncate(&g.instance_type, 36);
                    Row {
                        label: format!("{name} \u{00d7} {}", int(u64::from(g.count))),
                        sub,
                        bars: vec![Bar {
                            segs: vec![
                                Seg::solid(f64::from(assigned), BLUE, WHITE, "assigned").tip(
                                    format!("{}: {} pod IPs assigned", g.instance_type, assigned),
                                ),
                                Seg::solid(f64::from(g.unused_pod_ips_per_node), SKY, INK, "warm")
                                    .tip(format!(
                                        "{}: {} warm pod IPs",
                                        g.instance_type, g.unused_pod_ips_per_node
                                    )),
                                Seg::solid(f64::from(primaries), PRIMARY, WHITE, "primary").tip(
                                    format!("{}: {} ENI primary IPs", g.instance_type, primaries),
                                ),
                                Seg {
                                    value: f64::from(g.pods_without_ip_per_node),
                                    fill: VERMILLION,
                                    text: INK,
                                    class: "without-ip",
                                    hatch: true,
                                    tip: format!(
                                        "{}: {} pods without an IP",
                                        g.instance_type, g.pods_without_ip_per_node
                                    ),
                                },
                            ],
                            end: format!(
                                "{} per node \u{00b7} {} warm",
                                int(u64::from(g.subnet_ips_per_node)),
                                int(u64::from(g.unused_pod_ips_per_node))
                            ),
                        }],
                        alert: (!alerts.is_empty()).then(|| alerts.join(" \u{00b7} ")),
                    }
                })
                .collect();
        y = bar_rows(&mut s, y, &rows, "subnet addresses per node");
    }
    y = section(
        &mut s,
        y,
        "Subnet fill",
        &format!("all nodes of all groups in {}", sub.cidr),
    );
    let demand: u64 = groups
        .iter()
        .map(|g| u64::from(g.count) * u64::from(g.subnet_ips_per_node))
        .sum();
    y = fill_bars(
        &mut s,
        y,
        &[Fill {
            label: sub.cidr.to_string(),
            sub: format!("{} usable", int(u64::from(sub.usable_ips))),
            capacity: u64::from(sub.usable_ips),
            used: sub.ips_used,
            demand: demand.max(sub.ips_used),
            used_fill: SLATE,
            used_text: WHITE,
            capacity_word: "usable",
            parts: groups
                .iter()
                .map(|g| (truncate(&g.instance_type, 24), g.subnet_ips_total))
                .collect(),
        }],
    );
    let mut warnings = report.warnings.clone();
    for g in groups {
        for w in &g.warnings {
            warnings.push(format!("{}: {w}", g.instance_type));
        }
    }
    y = notes(&mut s, y, "Warnings", &warnings, 10);
    s.finish(y + PAD - 10.0, &title, &line)
}

// ---------------------------------------------------------------------------------------------
// Workbook mode
// ---------------------------------------------------------------------------------------------

/// One workbook row in the terms the charts use.
struct WbRow<'a> {
    instance_type: &'a str,
    instances: u32,
    pods_per_node: u32,
    used_ips: u32,
    enis: u32,
    ips_total: u64,
}

fn wb_rows(r: &WorkbookReport) -> Vec<WbRow<'_>> {
    match &r.rows {
        Rows::WarmEni(rows) => rows
            .iter()
            .map(|x| WbRow {
                instance_type: &x.basis.instance_type,
                instances: x.basis.instances,
                pods_per_node: x.basis.pods_per_node,
                used_ips: x.used_ips,
                enis: x.with_warm_eni,
                ips_total: x.ips_total,
            })
            .collect(),
        Rows::WarmIp(rows) => rows
            .iter()
            .map(|x| WbRow {
                instance_type: &x.basis.instance_type,
                instances: x.basis.instances,
                pods_per_node: x.basis.pods_per_node,
                used_ips: x.used_ips,
                enis: x.in_use_enis_with_warm,
                ips_total: x.ips_total,
            })
            .collect(),
    }
}

fn sheet_name(s: Sheet) -> (&'static str, &'static str) {
    match s {
        Sheet::WarmEni => ("WarmENI", "WARM_ENI_TARGET"),
        Sheet::WarmIp => ("WarmIP", "WARM_IP_TARGET"),
    }
}

/// Workbook chart: per row, the workbook's used IPs per node vs pods per node; subnet fill from
/// the summary cells.
pub fn workbook_chart(report: &WorkbookReport) -> String {
    let mut s = Svg::default();
    let (sheet, target) = sheet_name(report.sheet);
    let title = format!("Subnet plan \u{00b7} workbook, {sheet} sheet");
    let line = format!(
        "/{} \u{00b7} {} available \u{00b7} {} used \u{00b7} {} remaining \u{00b7} {} hosted \u{00b7} {target} {} \u{00b7} host networking IPs {}",
        report.cidr_size,
        int(report.total_available_ips),
        int(report.ips_used),
        signed(report.ips_remaining),
        plural(report.pods_hosted, "pod", "pods"),
        report.target,
        report.host_networking_ips,
    );
    let mut y = header(&mut s, &title, std::slice::from_ref(&line));
    y = legend(
        &mut s,
        PAD,
        y,
        WIDTH - PAD,
        &[
            (Key::Swatch(SKY), "pods per node".into()),
            (Key::Swatch(BLUE), "used IPs per node".into()),
        ],
    );
    let column = match report.sheet {
        Sheet::WarmEni => "column L, Used IPs PI",
        Sheet::WarmIp => "hidden column K, which the totals use",
    };
    y = section(&mut s, y, "Used IPs vs pods, per node", column);
    let rows = wb_rows(report);
    if rows.is_empty() {
        y = empty_note(&mut s, y, "No node groups in this plan.");
    } else {
        let bars: Vec<Row> = rows
            .iter()
            .map(|r| {
                let extra = i64::from(r.used_ips) - i64::from(r.pods_per_node);
                Row {
                    label: format!(
                        "{} \u{00d7} {}",
                        truncate(r.instance_type, 36),
                        int(u64::from(r.instances))
                    ),
                    sub: format!(
                        "{} \u{00b7} {} IPs in all",
                        plural(u64::from(r.enis), "ENI", "ENIs"),
                        int(r.ips_total)
                    ),
                    bars: vec![
                        Bar {
                            segs: vec![Seg::solid(f64::from(r.pods_per_node), SKY, INK, "pods")
                                .tip(format!(
                                    "{}: {} pods per node",
                                    r.instance_type, r.pods_per_node
                                ))],
                            end: format!("{} pods", int(u64::from(r.pods_per_node))),
                        },
                        Bar {
                            segs: vec![Seg::solid(f64::from(r.used_ips), BLUE, WHITE, "used").tip(
                                format!("{}: {} used IPs per node", r.instance_type, r.used_ips),
                            )],
                            end: format!("{} IPs ({} vs pods)", int(u64::from(r.used_ips)), {
                                if extra >= 0 {
                                    format!("+{}", int(extra.unsigned_abs()))
                                } else {
                                    signed(extra)
                                }
                            }),
                        },
                    ],
                    alert: None,
                }
            })
            .collect();
        y = bar_rows(&mut s, y, &bars, "addresses or pods per node");
    }
    y = section(
        &mut s,
        y,
        "Subnet fill",
        "summary cells B5 (available), B8 (used), B10 (remaining)",
    );
    y = fill_bars(
        &mut s,
        y,
        &[Fill {
            label: format!("/{}", report.cidr_size),
            sub: format!("{} available", int(report.total_available_ips)),
            capacity: report.total_available_ips,
            used: report.ips_used,
            demand: report.ips_used,
            used_fill: SLATE,
            used_text: WHITE,
            capacity_word: "available",
            parts: rows
                .iter()
                .map(|r| (truncate(r.instance_type, 24), r.ips_total))
                .collect(),
        }],
    );
    s.finish(y + PAD - 10.0, &title, &line)
}

/// Side by side: workbook vs exact subnet use (total and per group), one chart.
pub fn compare_chart(workbook: &WorkbookReport, exact: &ExactReport) -> String {
    let mut s = Svg::default();
    let (sheet, _) = sheet_name(workbook.sheet);
    let policy = policy_name(exact.policy);
    let title = "Subnet plan \u{00b7} workbook vs exact mode".to_owned();
    let diff = exact.subnet.ips_used as i64 - workbook.ips_used as i64;
    let lines = vec![
        format!(
            "workbook ({sheet} sheet): {} of {} used, {} remaining \u{00b7} exact ({policy} policy): {} of {} used, {} remaining",
            int(workbook.ips_used),
            int(workbook.total_available_ips),
            signed(workbook.ips_remaining),
            int(exact.subnet.ips_used),
            int(u64::from(exact.subnet.usable_ips)),
            signed(exact.subnet.ips_remaining),
        ),
        format!(
            "the daemon uses {} addresses {} the workbook predicts \u{00b7} pods hosted: workbook {}, exact {}",
            int(diff.unsigned_abs()),
            if diff >= 0 { "more than" } else { "fewer than" },
            int(workbook.pods_hosted),
            int(exact.pods_hosted),
        ),
    ];
    let mut y = header(&mut s, &title, &lines);
    y = legend(
        &mut s,
        PAD,
        y,
        WIDTH - PAD,
        &[
            (Key::Swatch(ORANGE), format!("workbook ({sheet} sheet)")),
            (Key::Swatch(BLUE), format!("exact ({policy} policy)")),
        ],
    );
    y = section(
        &mut s,
        y,
        "Whole subnet",
        "the workbook counts 2 reserved addresses, AWS reserves 5",
    );
    let wrows = wb_rows(workbook);
    let groups = &exact.node_groups;
    let demand: u64 = groups
        .iter()
        .map(|g| u64::from(g.count) * u64::from(g.subnet_ips_per_node))
        .sum();
    y = fill_bars(
        &mut s,
        y,
        &[
            Fill {
                label: "Workbook".into(),
                sub: format!(
                    "/{}, {} available",
                    workbook.cidr_size,
                    int(workbook.total_available_ips)
                ),
                capacity: workbook.total_available_ips,
                used: workbook.ips_used,
                demand: workbook.ips_used,
                used_fill: ORANGE,
                used_text: INK,
                capacity_word: "available",
                parts: wrows
                    .iter()
                    .map(|r| (truncate(r.instance_type, 24), r.ips_total))
                    .collect(),
            },
            Fill {
                label: "Exact".into(),
                sub: format!(
                    "{}, {} usable",
                    exact.subnet.cidr,
                    int(u64::from(exact.subnet.usable_ips))
                ),
                capacity: u64::from(exact.subnet.usable_ips),
                used: exact.subnet.ips_used,
                demand: demand.max(exact.subnet.ips_used),
                used_fill: BLUE,
                used_text: WHITE,
                capacity_word: "usable",
                parts: groups
                    .iter()
                    .map(|g| (truncate(&g.instance_type, 24), g.subnet_ips_total))
                    .collect(),
            },
        ],
    );
    y = section(
        &mut s,
        y,
        "Subnet addresses per node group",
        "all nodes of the group",
    );
    let n = wrows.len().max(groups.len());
    if n == 0 {
        y = empty_note(&mut s, y, "No node groups in this plan.");
    } else {
        let rows: Vec<Row> = (0..n)
            .map(|i| {
                let w = wrows.get(i);
                let e = groups.get(i);
                let name = e
                    .map(|g| g.instance_type.as_str())
                    .or(w.map(|r| r.instance_type))
                    .unwrap_or_default();
                let count = e.map(|g| g.count).or(w.map(|r| r.instances)).unwrap_or(0);
                let pods = e
                    .map(|g| g.pods_per_node)
                    .or(w.map(|r| r.pods_per_node))
                    .unwrap_or(0);
                let wv = w.map(|r| r.ips_total);
                let ev = e.map(|g| g.subnet_ips_total);
                let bar =
                    |v: Option<u64>, fill: &'static str, class: &'static str, who: &str| Bar {
                        segs: v
                            .map(|v| {
                                vec![Seg::solid(
                                    v as f64,
                                    fill,
                                    if fill == ORANGE { INK } else { WHITE },
                                    class,
                                )
                                .tip(format!("{name}: {who} {v} subnet addresses"))]
                            })
                            .unwrap_or_default(),
                        end: v.map(int).unwrap_or_else(|| "n/a".into()),
                    };
                let delta = match (wv, ev) {
                    (Some(a), Some(b)) => {
                        let d = b as i64 - a as i64;
                        let pct = if a > 0 {
                            let p = (d as f64 * 100.0 / a as f64).round() as i64;
                            format!(
                                " ({}{}%)",
                                if p < 0 { "\u{2212}" } else { "+" },
                                p.unsigned_abs()
                            )
                        } else {
                            String::new()
                        };
                        if d == 0 {
                            "same".to_owned()
                        } else {
                            format!(
                                "exact {}{}{pct}",
                                if d > 0 { "+" } else { "\u{2212}" },
                                int(d.unsigned_abs())
                            )
                        }
                    }
                    _ => String::new(),
                };
                let mut end_bar = bar(ev, BLUE, "exact", "exact");
                if !delta.is_empty() {
                    end_bar.end = format!("{}  \u{00b7} {delta}", end_bar.end);
                }
                Row {
                    label: format!("{} \u{00d7} {}", truncate(name, 36), int(u64::from(count))),
                    sub: format!("{} pods/node", int(u64::from(pods))),
                    bars: vec![bar(wv, ORANGE, "workbook", "workbook"), end_bar],
                    alert: e.filter(|g| g.pods_without_ip_total > 0).map(|g| {
                        format!(
                            "\u{26a0} {} without an IP",
                            plural(g.pods_without_ip_total, "pod", "pods")
                        )
                    }),
                }
            })
            .collect();
        y = bar_rows(&mut s, y, &rows, "subnet addresses, all nodes of the group");
    }
    s.finish(y + PAD - 10.0, &title, &lines.join(" "))
}

// ---------------------------------------------------------------------------------------------
// Timelines
// ---------------------------------------------------------------------------------------------

/// Thins `samples` to at most `max` (at least 4), keeping the first and last and, for each
/// stretch between, the samples with the fewest and the most addresses in demand.
fn downsample(samples: &[Sample], max: usize) -> Vec<&Sample> {
    let max = max.max(4);
    let n = samples.len();
    if n <= max {
        return samples.iter().collect();
    }
    let key = |s: &Sample| s.allocated_ips + s.pods_pending;
    let inner = &samples[1..n - 1];
    let buckets = (max - 2) / 2;
    let mut out = Vec::with_capacity(max);
    out.push(&samples[0]);
    for b in 0..buckets {
        let lo = b * inner.len() / buckets;
        let hi = (b + 1) * inner.len() / buckets;
        let chunk = &inner[lo..hi];
        if chunk.is_empty() {
            continue;
        }
        let (mut imin, mut imax) = (0, 0);
        for (i, s) in chunk.iter().enumerate() {
            if key(s) < key(&chunk[imin]) {
                imin = i;
            }
            if key(s) > key(&chunk[imax]) {
                imax = i;
            }
        }
        let (a, z) = (imin.min(imax), imin.max(imax));
        out.push(&chunk[a]);
        if z != a {
            out.push(&chunk[z]);
        }
    }
    out.push(&samples[n - 1]);
    out
}

fn time_end(r: &TimelineReport) -> f64 {
    let last = r.samples.last().map(|s| s.t).unwrap_or(0);
    r.duration.max(last).max(1) as f64
}

/// `(t, value)` points of one series; a single sample is held flat to `t_end`.
fn points(picks: &[&Sample], t_end: f64, f: impl Fn(&Sample) -> f64) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = picks.iter().map(|s| (s.t as f64, f(s).max(0.0))).collect();
    if let [(t, v)] = p[..] {
        if t_end > t {
            p.push((t_end, v));
        } else {
            p.insert(0, (0.0, v));
        }
    }
    p
}

fn used_pct(usable: u32, free: u32) -> f64 {
    if usable == 0 {
        0.0
    } else {
        f64::from(usable.saturating_sub(free)) * 100.0 / f64::from(usable)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Unit {
    Count,
    Percent,
}

/// A plot area with its scales.
struct Plot {
    x0: f64,
    x1: f64,
    top: f64,
    bottom: f64,
    t_end: f64,
    y_max: f64,
}

impl Plot {
    fn x(&self, t: f64) -> f64 {
        self.x0 + (self.x1 - self.x0) * (t / self.t_end).clamp(0.0, 1.0)
    }
    fn y(&self, v: f64) -> f64 {
        self.bottom - (self.bottom - self.top) * (v / self.y_max).clamp(0.0, 1.0)
    }
    fn line(&self, pts: &[(f64, f64)]) -> String {
        let mut d = String::with_capacity(pts.len() * 14);
        for (i, (t, v)) in pts.iter().enumerate() {
            let _ = write!(
                d,
                "{}{},{}",
                if i == 0 { "M" } else { "L" },
                num(self.x(*t)),
                num(self.y(*v))
            );
        }
        d
    }
    /// The band between `lower` and `upper` (same times).
    fn band(&self, lower: &[(f64, f64)], upper: &[(f64, f64)]) -> String {
        let mut d = self.line(upper);
        for (t, v) in lower.iter().rev() {
            let _ = write!(d, "L{},{}", num(self.x(*t)), num(self.y(*v)));
        }
        d.push('Z');
        d
    }
}

struct PanelSpec<'a> {
    title: &'a str,
    legend: Vec<(Key<'a>, String)>,
    height: f64,
    t_end: f64,
    y_max: f64,
    unit: Unit,
}

/// Draws a panel's title, legend, grid and axes; returns its plot and the y below it.
fn panel(s: &mut Svg, y: f64, spec: &PanelSpec<'_>) -> (Plot, f64) {
    let x0 = PAD + 50.0;
    let x1 = WIDTH - PAD - 8.0;
    s.text(PAD, y + 14.0, spec.title, HEAD);
    let lx = PAD + font_w(spec.title, HEAD) + 24.0;
    let after = legend(s, lx, y + 14.0, WIDTH - PAD, &spec.legend);
    let top = after - 4.0;
    let bottom = top + spec.height;
    let (y_max, step) = match spec.unit {
        Unit::Count => nice_axis(spec.y_max, 5),
        Unit::Percent => (100.0, 25.0),
    };
    let p = Plot {
        x0,
        x1,
        top,
        bottom,
        t_end: spec.t_end,
        y_max,
    };
    s.open(r#"class="axes""#);
    for v in ticks(y_max, step) {
        let yy = p.y(v);
        s.line(
            (x0, yy),
            (x1, yy),
            if v == 0.0 { FAINT } else { GRID },
            r#"stroke-width="1""#,
        );
        let label = match spec.unit {
            Unit::Count => compact(v),
            Unit::Percent => format!("{}%", v.round()),
        };
        s.text(x0 - 6.0, yy + 4.0, &label, TICK.end());
    }
    for t in time_ticks(spec.t_end) {
        let xx = p.x(t);
        s.line(
            (xx, top),
            (xx, bottom),
            GRID,
            r#"stroke-width="1" stroke-dasharray="2 3""#,
        );
        s.line(
            (xx, bottom),
            (xx, bottom + 4.0),
            FAINT,
            r#"stroke-width="1""#,
        );
        s.text(xx, bottom + 16.0, &dur(t.round() as u64), TICK.middle());
    }
    s.close();
    (p, bottom + 40.0)
}

fn series_path(
    s: &mut Svg,
    p: &Plot,
    name: &str,
    pts: &[(f64, f64)],
    stroke: &str,
    dash: Option<&str>,
) {
    let d = dash
        .map(|d| format!(r#" stroke-dasharray="{d}""#))
        .unwrap_or_default();
    series_path_with(s, p, name, pts, stroke, &format!(r#"stroke-width="2"{d}"#));
}

fn series_path_with(
    s: &mut Svg,
    p: &Plot,
    name: &str,
    pts: &[(f64, f64)],
    stroke: &str,
    style: &str,
) {
    s.path(
        &p.line(pts),
        &format!(
            r#"class="series line" data-series="{}" fill="none" stroke="{stroke}" stroke-linejoin="round" {style}"#,
            esc(name)
        ),
    );
}

fn area_path(
    s: &mut Svg,
    p: &Plot,
    name: &str,
    lower: &[(f64, f64)],
    upper: &[(f64, f64)],
    fill: &str,
) {
    s.path(
        &p.band(lower, upper),
        &format!(
            r#"class="series area" data-series="{}" fill="{fill}" fill-opacity="0.9" stroke="none""#,
            esc(name)
        ),
    );
}

/// A subnet's first refusal, as drawn.
struct Mark {
    at: u64,
    colour: &'static str,
    text: String,
}

fn exhaustion_text(e: &crate::timeline::Exhaustion) -> String {
    format!(
        "{} ran out {} ({})",
        truncate(&e.subnet, 30),
        at_time(e.at),
        capacity_error_name(e.error)
    )
}

/// Vertical markers at the moments subnets first refused; labelled (stacked from the bottom of
/// the plot, with a white halo) when `labelled`.
fn exhaustion_marks(s: &mut Svg, p: &Plot, marks: &[Mark], labelled: bool) {
    for (i, m) in marks.iter().enumerate() {
        let x = p.x(m.at as f64);
        s.line(
            (x, p.top),
            (x, p.bottom),
            m.colour,
            r#"stroke-width="1.5" stroke-dasharray="5 3" class="exhaustion""#,
        );
        if !labelled {
            continue;
        }
        s.path(
            &format!(
                "M{},{}L{},{}L{},{}Z",
                num(x - 5.0),
                num(p.top - 1.0),
                num(x + 5.0),
                num(p.top - 1.0),
                num(x),
                num(p.top + 7.0)
            ),
            &format!(r#"fill="{}""#, m.colour),
        );
        let ty = p.bottom - 8.0 - 15.0 * (marks.len() - 1 - i) as f64;
        let w = font_w(&m.text, VALUE.bold());
        let f = VALUE.fill(m.colour).bold();
        let halo = format!(
            r#"class="exhaustion-label" stroke="{WHITE}" stroke-width="3" stroke-linejoin="round" paint-order="stroke""#
        );
        if x + 8.0 + w <= p.x1 {
            s.text_with(x + 8.0, ty, &m.text, f, &halo);
        } else {
            s.text_with(x - 8.0, ty, &m.text, f.end(), &halo);
        }
    }
}

fn subnet_key(i: usize) -> (&'static str, Option<&'static str>) {
    let c = SERIES[i % SERIES.len()];
    let dash = match (i / SERIES.len()) % 3 {
        0 => None,
        1 => Some("7 4"),
        _ => Some("2 3"),
    };
    (c, dash)
}

/// Timeline chart(s) in one SVG: stacked area of assigned / warm / cooling addresses over time
/// with pending pods as a line, ENIs over time, subnet fill (used % per subnet) over time with
/// the exhaustion moments marked, and cumulative EC2 mutating calls. Time axis in h/m labels.
pub fn timeline_chart(report: &TimelineReport) -> String {
    let r = report;
    let mut s = Svg::default();
    let picks = downsample(&r.samples, MAX_POINTS);
    let t_end = time_end(r);
    let title = format!(
        "Pool timeline \u{00b7} {} policy \u{00b7} {} \u{00b7} {}",
        policy_name(r.policy),
        plural(r.nodes, "node", "nodes"),
        dur(r.duration)
    );
    let max_of = |f: &dyn Fn(&Sample) -> u64| r.samples.iter().map(f).max().unwrap_or(0);
    let mutating = crate::timeline::mutating_calls(r);
    let mut lines = vec![format!(
        "{} at {}s ticks \u{00b7} peak {} pod IPs allocated for {} \u{00b7} up to {} \u{00b7} {} mutating EC2 calls ({} in all)",
        dur(r.duration),
        r.tick,
        int(max_of(&|s| s.allocated_ips)),
        plural(max_of(&|s| s.assigned_ips), "pod", "pods"),
        plural(max_of(&|s| s.enis), "ENI", "ENIs"),
        int(mutating),
        int(r.ec2_calls.total()),
    )];
    lines.push(if r.max_pods_pending == 0 {
        "no pod waited for an IP".to_owned()
    } else {
        format!(
            "up to {} waiting for an IP at once \u{00b7} pod waiting time {} in all",
            plural(r.max_pods_pending, "pod", "pods"),
            dur(r.pending_pod_seconds)
        )
    });
    let mut subnets: Vec<String> = r
        .subnets
        .iter()
        .take(6)
        .map(|x| {
            format!(
                "subnet {} ({}): fewest free {} of {}",
                truncate(&x.name, 30),
                x.cidr,
                int(u64::from(x.min_free)),
                int(u64::from(x.usable_ips))
            )
        })
        .collect();
    if r.subnets.len() > 6 {
        subnets.push(format!("{} more subnets", r.subnets.len() - 6));
    }
    if r.exhaustion.is_empty() {
        subnets.push("no subnet ran out".into());
    } else {
        for e in &r.exhaustion {
            subnets.push(format!(
                "{} ran out {}",
                truncate(&e.subnet, 30),
                at_time(e.at)
            ));
        }
    }
    lines.push(subnets.join(" \u{00b7} "));
    let mut y = header(&mut s, &title, &lines);
    if picks.is_empty() {
        y = empty_note(&mut s, y, "The timeline has no samples.");
        return s.finish(y + PAD - 10.0, &title, &lines.join(" "));
    }
    let marks: Vec<Mark> = r
        .exhaustion
        .iter()
        .map(|e| Mark {
            at: e.at,
            colour: VERMILLION,
            text: exhaustion_text(e),
        })
        .collect();
    // 1. Addresses.
    let assigned = points(&picks, t_end, |s| s.assigned_ips as f64);
    let warm = points(&picks, t_end, |s| (s.assigned_ips + s.warm_ips) as f64);
    let cooling = points(&picks, t_end, |s| {
        (s.assigned_ips + s.warm_ips + s.cooling_ips) as f64
    });
    let pending = points(&picks, t_end, |s| s.pods_pending as f64);
    let zero: Vec<(f64, f64)> = assigned.iter().map(|(t, _)| (*t, 0.0)).collect();
    let y_max = picks
        .iter()
        .map(|s| {
            (s.assigned_ips + s.warm_ips + s.cooling_ips)
                .max(s.allocated_ips)
                .max(s.pods_pending)
        })
        .max()
        .unwrap_or(0) as f64;
    let (p, next) = panel(
        &mut s,
        y,
        &PanelSpec {
            title: "Pod addresses",
            legend: vec![
                (Key::Swatch(BLUE), "assigned".into()),
                (Key::Swatch(SKY), "warm".into()),
                (Key::Swatch(PURPLE), "cooling down".into()),
                (Key::Line(VERMILLION, None), "pods waiting for an IP".into()),
            ],
            height: 210.0,
            t_end,
            y_max,
            unit: Unit::Count,
        },
    );
    area_path(&mut s, &p, "assigned", &zero, &assigned, BLUE);
    area_path(&mut s, &p, "warm", &assigned, &warm, SKY);
    area_path(&mut s, &p, "cooling", &warm, &cooling, PURPLE);
    series_path(&mut s, &p, "pending", &pending, VERMILLION, None);
    exhaustion_marks(&mut s, &p, &marks, false);
    y = next;
    // 2. ENIs.
    let enis = points(&picks, t_end, |s| s.enis as f64);
    let (p, next) = panel(
        &mut s,
        y,
        &PanelSpec {
            title: "ENIs attached",
            legend: vec![(Key::Line(GREEN, None), "ENIs across the fleet".into())],
            height: 110.0,
            t_end,
            y_max: picks.iter().map(|s| s.enis).max().unwrap_or(0) as f64,
            unit: Unit::Count,
        },
    );
    let zero_e: Vec<(f64, f64)> = enis.iter().map(|(t, _)| (*t, 0.0)).collect();
    s.path(
        &p.band(&zero_e, &enis),
        &format!(r#"fill="{GREEN}" fill-opacity="0.15" stroke="none""#),
    );
    series_path(&mut s, &p, "enis", &enis, GREEN, None);
    exhaustion_marks(&mut s, &p, &marks, false);
    y = next;
    // 3. Subnet fill.
    let legend_items: Vec<(Key<'_>, String)> = r
        .subnets
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let (c, d) = subnet_key(i);
            (
                Key::Line(c, d),
                format!("{} ({})", truncate(&x.name, 24), x.cidr),
            )
        })
        .collect();
    let (p, next) = panel(
        &mut s,
        y,
        &PanelSpec {
            title: "Subnet used",
            legend: legend_items,
            height: 150.0,
            t_end,
            y_max: 100.0,
            unit: Unit::Percent,
        },
    );
    s.line(
        (p.x0, p.y(100.0)),
        (p.x1, p.y(100.0)),
        INK,
        r#"stroke-width="1" stroke-dasharray="6 3" opacity="0.45""#,
    );
    for (i, sub) in r.subnets.iter().enumerate() {
        let (c, d) = subnet_key(i);
        let pts = points(&picks, t_end, |s| {
            used_pct(
                sub.usable_ips,
                s.subnet_free.get(i).copied().unwrap_or(sub.usable_ips),
            )
        });
        series_path(&mut s, &p, &format!("subnet {}", sub.name), &pts, c, d);
    }
    exhaustion_marks(&mut s, &p, &marks, true);
    y = next;
    // 4. EC2 calls.
    let muts = points(&picks, t_end, |s| s.ec2_mutating_calls as f64);
    let all = points(&picks, t_end, |s| s.ec2_calls as f64);
    let (p, next) = panel(
        &mut s,
        y,
        &PanelSpec {
            title: "EC2 calls so far",
            legend: vec![
                (Key::Line(ORANGE, None), "mutating".into()),
                (
                    Key::Line(FAINT, Some("5 3")),
                    "all, describes included".into(),
                ),
            ],
            height: 110.0,
            t_end,
            y_max: picks
                .iter()
                .map(|s| s.ec2_calls.max(s.ec2_mutating_calls))
                .max()
                .unwrap_or(0) as f64,
            unit: Unit::Count,
        },
    );
    series_path(&mut s, &p, "all calls", &all, FAINT, Some("5 3"));
    series_path(&mut s, &p, "mutating calls", &muts, ORANGE, None);
    exhaustion_marks(&mut s, &p, &marks, false);
    y = next;
    s.text(WIDTH / 2.0, y - 6.0, "time since start", SMALL.middle());
    s.finish(y + PAD - 10.0, &title, &lines.join(" "))
}

/// Two timelines of the same input (reference vs ours policy) overlaid or stacked for
/// comparison.
pub fn timeline_compare_chart(a: &TimelineReport, b: &TimelineReport) -> String {
    let mut s = Svg::default();
    let (na, nb) = (policy_name(a.policy), policy_name(b.policy));
    let (la, lb) = if na == nb {
        (format!("A ({na})"), format!("B ({nb})"))
    } else {
        (na.to_owned(), nb.to_owned())
    };
    const CA: &str = ORANGE;
    const CB: &str = BLUE;
    const DASH_A: Option<&str> = Some("7 4");
    // B is drawn first, wide and translucent, A on top, dashed: where they agree both show.
    const STYLE_B: &str = r#"stroke-width="3.5" stroke-opacity="0.6""#;
    let title = format!("Pool timeline \u{00b7} {la} vs {lb}");
    let summary = |name: &str, r: &TimelineReport| {
        let peak = r.samples.iter().map(|s| s.allocated_ips).max().unwrap_or(0);
        let enis = r.samples.iter().map(|s| s.enis).max().unwrap_or(0);
        format!(
            "{name}: peak {} pod IPs, up to {} \u{00b7} idle {} on average, {} at most \u{00b7} {} mutating EC2 calls \u{00b7} {} \u{00b7} {}",
            int(peak),
            plural(enis, "ENI", "ENIs"),
            int(r.idle_ips_avg.round() as u64),
            int(r.idle_ips_peak),
            int(crate::timeline::mutating_calls(r)),
            if r.max_pods_pending == 0 {
                "no pod waited".to_owned()
            } else {
                format!(
                    "up to {} waiting, pod waiting time {}",
                    int(r.max_pods_pending),
                    dur(r.pending_pod_seconds)
                )
            },
            if r.exhaustion.is_empty() {
                "no subnet ran out".to_owned()
            } else {
                format!(
                    "a subnet ran out {}",
                    at_time(r.exhaustion.iter().map(|e| e.at).min().unwrap_or(0))
                )
            }
        )
    };
    let lines = vec![
        format!(
            "{} \u{00b7} {} at {}s ticks",
            plural(a.nodes.max(b.nodes), "node", "nodes"),
            dur(a.duration.max(b.duration)),
            a.tick
        ),
        summary(&la, a),
        summary(&lb, b),
        {
            let peak =
                |r: &TimelineReport| r.samples.iter().map(|s| s.allocated_ips).max().unwrap_or(0);
            let d = |x: u64, y: u64| {
                let v = y as i64 - x as i64;
                if v > 0 {
                    format!("+{}", int(v.unsigned_abs()))
                } else {
                    signed(v)
                }
            };
            let wait = b.pending_pod_seconds as i64 - a.pending_pod_seconds as i64;
            format!(
                "{lb} against {la}: peak pod IPs {} \u{00b7} idle on average {} \u{00b7} mutating EC2 calls {} \u{00b7} pod waiting time {}{}",
                d(peak(a), peak(b)),
                d(a.idle_ips_avg.round() as u64, b.idle_ips_avg.round() as u64),
                d(crate::timeline::mutating_calls(a), crate::timeline::mutating_calls(b)),
                if wait < 0 { "\u{2212}" } else if wait > 0 { "+" } else { "" },
                dur(wait.unsigned_abs())
            )
        },
    ];
    let mut y = header(&mut s, &title, &lines);
    let pa = downsample(&a.samples, MAX_POINTS);
    let pb = downsample(&b.samples, MAX_POINTS);
    if pa.is_empty() && pb.is_empty() {
        y = empty_note(&mut s, y, "Neither timeline has samples.");
        return s.finish(y + PAD - 10.0, &title, &lines.join(" "));
    }
    let t_end = time_end(a).max(time_end(b));
    y = legend(
        &mut s,
        PAD,
        y,
        WIDTH - PAD,
        &[
            (Key::Line(CA, DASH_A), la.clone()),
            (Key::Line(CB, None), lb.clone()),
            (Key::Swatch(GRID), "pods wanted".into()),
        ],
    ) + 4.0;
    let both_max = |f: &dyn Fn(&Sample) -> u64| {
        pa.iter().chain(pb.iter()).map(|s| f(s)).max().unwrap_or(0) as f64
    };
    let draw = |s: &mut Svg, p: &Plot, name: &str, f: &dyn Fn(&Sample) -> f64| {
        if !pb.is_empty() {
            let pts = points(&pb, t_end, f);
            series_path_with(s, p, &format!("{lb} {name}"), &pts, CB, STYLE_B);
        }
        if !pa.is_empty() {
            series_path(
                s,
                p,
                &format!("{la} {name}"),
                &points(&pa, t_end, f),
                CA,
                DASH_A,
            );
        }
    };
    // A subnet that ran out at the same moment the same way in both gets one mark.
    let mut all_marks: Vec<Mark> = Vec::new();
    for e in &a.exhaustion {
        let same = b.exhaustion.contains(e);
        all_marks.push(Mark {
            at: e.at,
            colour: if same { VERMILLION } else { CA },
            text: format!(
                "{}: {}",
                if same { "both" } else { la.as_str() },
                exhaustion_text(e)
            ),
        });
    }
    for e in b.exhaustion.iter().filter(|e| !a.exhaustion.contains(e)) {
        all_marks.push(Mark {
            at: e.at,
            colour: CB,
            text: format!("{lb}: {}", exhaustion_text(e)),
        });
    }
    all_marks.sort_by_key(|m| m.at);
    let marks = |s: &mut Svg, p: &Plot, labelled: bool| {
        exhaustion_marks(s, p, &all_marks, labelled);
    };
    // 1. Allocated pod addresses over demand.
    let (p, next) = panel(
        &mut s,
        y,
        &PanelSpec {
            title: "Pod addresses allocated",
            legend: vec![],
            height: 190.0,
            t_end,
            y_max: both_max(&|s| s.allocated_ips.max(s.pods_wanted)),
            unit: Unit::Count,
        },
    );
    let wanted_src = if pa.is_empty() { &pb } else { &pa };
    let wanted = points(wanted_src, t_end, |s| s.pods_wanted as f64);
    let zero: Vec<(f64, f64)> = wanted.iter().map(|(t, _)| (*t, 0.0)).collect();
    s.path(
        &p.band(&zero, &wanted),
        &format!(r#"class="series area" data-series="pods wanted" fill="{GRID}" stroke="none""#),
    );
    draw(&mut s, &p, "allocated", &|s| s.allocated_ips as f64);
    marks(&mut s, &p, false);
    y = next;
    // 1b. Idle addresses: allocated but not assigned (cooling included).
    let (p, next) = panel(
        &mut s,
        y,
        &PanelSpec {
            title: "Idle pod addresses (allocated \u{2212} assigned)",
            legend: vec![],
            height: 120.0,
            t_end,
            y_max: both_max(&|s| s.allocated_ips.saturating_sub(s.assigned_ips)),
            unit: Unit::Count,
        },
    );
    draw(&mut s, &p, "idle", &|s| {
        s.allocated_ips.saturating_sub(s.assigned_ips) as f64
    });
    marks(&mut s, &p, false);
    y = next;
    // 2. Pending pods.
    let (p, next) = panel(
        &mut s,
        y,
        &PanelSpec {
            title: "Pods waiting for an IP",
            legend: vec![],
            height: 100.0,
            t_end,
            y_max: both_max(&|s| s.pods_pending),
            unit: Unit::Count,
        },
    );
    draw(&mut s, &p, "pending", &|s| s.pods_pending as f64);
    marks(&mut s, &p, false);
    y = next;
    // 3. ENIs.
    let (p, next) = panel(
        &mut s,
        y,
        &PanelSpec {
            title: "ENIs attached",
            legend: vec![],
            height: 100.0,
            t_end,
            y_max: both_max(&|s| s.enis),
            unit: Unit::Count,
        },
    );
    draw(&mut s, &p, "enis", &|s| s.enis as f64);
    marks(&mut s, &p, false);
    y = next;
    // 4. Subnet use, all subnets together.
    let usable_a: u64 = a.subnets.iter().map(|x| u64::from(x.usable_ips)).sum();
    let usable_b: u64 = b.subnets.iter().map(|x| u64::from(x.usable_ips)).sum();
    let pct = |usable: u64, s: &Sample| {
        let free: u64 = s.subnet_free.iter().map(|f| u64::from(*f)).sum();
        if usable == 0 {
            0.0
        } else {
            usable.saturating_sub(free) as f64 * 100.0 / usable as f64
        }
    };
    let (p, next) = panel(
        &mut s,
        y,
        &PanelSpec {
            title: "Subnet used",
            legend: vec![],
            height: 130.0,
            t_end,
            y_max: 100.0,
            unit: Unit::Percent,
        },
    );
    s.line(
        (p.x0, p.y(100.0)),
        (p.x1, p.y(100.0)),
        INK,
        r#"stroke-width="1" stroke-dasharray="6 3" opacity="0.45""#,
    );
    if !pb.is_empty() {
        let pts = points(&pb, t_end, |s| pct(usable_b, s));
        series_path_with(&mut s, &p, &format!("{lb} subnet used"), &pts, CB, STYLE_B);
    }
    if !pa.is_empty() {
        let pts = points(&pa, t_end, |s| pct(usable_a, s));
        series_path(&mut s, &p, &format!("{la} subnet used"), &pts, CA, DASH_A);
    }
    marks(&mut s, &p, true);
    y = next;
    // 5. Mutating EC2 calls.
    let (p, next) = panel(
        &mut s,
        y,
        &PanelSpec {
            title: "Mutating EC2 calls so far",
            legend: vec![],
            height: 110.0,
            t_end,
            y_max: both_max(&|s| s.ec2_mutating_calls),
            unit: Unit::Count,
        },
    );
    draw(&mut s, &p, "mutating calls", &|s| {
        s.ec2_mutating_calls as f64
    });
    marks(&mut s, &p, false);
    y = next;
    s.text(WIDTH / 2.0, y - 6.0, "time since start", SMALL.middle());
    s.finish(y + PAD - 10.0, &title, &lines.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::{self, ExactReport};
    use crate::limits::Catalog;
    use crate::plan::PlanInput;
    use crate::timeline::{simulate, TimelineInput};
    use crate::workbook;

    const CLUSTER: &str = "subnet: {cidr: 10.0.0.0/23}
config: {warm_eni_target: 1}
node_groups:
  - {instance_type: m5.12xlarge, count: 2, pods_per_node: 100}
  - {instance_type: c5.2xlarge, count: 1, pods_per_node: 30}
";

    const HOSTILE: &str = "</text><script>&amp;\"'";

    fn exact_of(yaml: &str) -> ExactReport {
        let p = PlanInput::parse(yaml).expect("parse");
        let g = p.resolve(Catalog::embedded()).expect("resolve");
        exact::plan(&p, &g).expect("plan")
    }

    fn workbook_of(yaml: &str, sheet: Sheet) -> WorkbookReport {
        workbook::compute(&PlanInput::parse(yaml).expect("parse"), sheet).expect("compute")
    }

    fn timeline_of(yaml: &str) -> TimelineReport {
        simulate(
            TimelineInput::parse(yaml).expect("parse"),
            Catalog::embedded(),
        )
        .expect("run")
    }

    /// Parses the chart and checks what every chart must be: an `svg` root whose width and
    /// height match its viewBox, a title, no script, no numbers gone wrong.
    fn check(svg: &str) -> roxmltree::Document<'_> {
        let doc = roxmltree::Document::parse(svg).expect("well-formed XML");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(
            root.tag_name().namespace(),
            Some("http://www.w3.org/2000/svg")
        );
        let w = root.attribute("width").expect("width");
        let h = root.attribute("height").expect("height");
        assert_eq!(
            root.attribute("viewBox"),
            Some(format!("0 0 {w} {h}").as_str())
        );
        assert!(h.parse::<f64>().expect("numeric height") > 100.0);
        assert!(doc.descendants().any(|n| n.has_tag_name("title")));
        for n in doc.descendants() {
            assert!(!n.has_tag_name("script"), "a script element");
            assert!(!n.has_tag_name("foreignObject"));
            for a in n.attributes() {
                assert!(!a.name().starts_with("on"), "event handler {}", a.name());
                assert!(
                    !a.value().contains("NaN") && !a.value().contains("inf"),
                    "{a:?}"
                );
            }
        }
        doc
    }

    fn with_class<'a>(
        doc: &'a roxmltree::Document<'_>,
        class: &str,
    ) -> Vec<roxmltree::Node<'a, 'a>> {
        doc.descendants()
            .filter(|n| {
                n.attribute("class")
                    .is_some_and(|c| c.split_whitespace().any(|x| x == class))
            })
            .collect()
    }

    fn texts(doc: &roxmltree::Document<'_>) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or_default().to_owned())
            .collect()
    }

    fn series<'a>(doc: &'a roxmltree::Document<'_>) -> Vec<&'a str> {
        doc.descendants()
            .filter_map(|n| n.attribute("data-series"))
            .collect()
    }

    /// Points in a path's `d` (one per M/L command).
    fn path_points(d: &str) -> usize {
        d.chars().filter(|c| *c == 'M' || *c == 'L').count()
    }

    #[test]
    fn escaping_covers_markup_quotes_and_characters_xml_forbids() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&apos;"
        );
        assert_eq!(esc("a\u{1}b\u{FFFF}"), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(esc("tab\tok"), "tab\tok");
    }

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(int(0), "0");
        assert_eq!(int(1_234_567), "1,234,567");
        assert_eq!(signed(-22), "\u{2212}22");
        assert_eq!(
            (num(-0.01), num(12.0), num(3.25), num(f64::NAN)),
            ("0".into(), "12".into(), "3.3".into(), "0".into())
        );
        assert_eq!(compact(1500.0), "1,500");
        assert_eq!(compact(15_000.0), "15k");
        assert_eq!(compact(12_500.0), "12.5k");
        assert_eq!(compact(2_000_000.0), "2M");
        assert_eq!(dur(0), "0");
        assert_eq!(dur(45), "45s");
        assert_eq!(dur(5400), "1h30m");
        assert_eq!(dur(3600), "1h");
        assert_eq!(dur(86_400 + 7200 + 60), "1d2h");
        assert_eq!(at_time(0), "at the start");
    }

    #[test]
    fn axes_are_nice_and_cover_the_data() {
        assert_eq!(nice_axis(105.0, 6), (120.0, 20.0));
        assert_eq!(nice_axis(448.0, 5), (500.0, 100.0));
        assert_eq!(
            nice_axis(0.0, 5),
            (1.0, 1.0),
            "empty data still gets an axis"
        );
        assert_eq!(
            nice_axis(3.0, 6),
            (3.0, 1.0),
            "counts never get fractional steps"
        );
        assert_eq!(nice_axis(2300.0, 5), (2500.0, 500.0));
        assert_eq!(nice_axis(2300.0, 10), (2500.0, 250.0));
        for max in [1.0, 7.0, 59.0, 507.0, 4091.0, 65_531.0, 1e7] {
            let (top, step) = nice_axis(max, 5);
            assert!(
                top >= max && step >= 1.0 && step.fract() == 0.0,
                "{max}: {top} {step}"
            );
            assert!(ticks(top, step).len() <= 12, "{max}");
        }
        assert_eq!(time_ticks(86_400.0).len(), 9, "3h steps over a day");
        assert_eq!(time_ticks(3600.0)[1], 600.0);
        assert_eq!(time_ticks(1.0), vec![0.0, 1.0]);
        assert!(time_ticks(30.0 * 86_400.0).len() <= 9);
    }

    #[test]
    fn long_text_wraps_at_separators_and_long_words_are_cut() {
        let lines = wrap(
            "aaaa \u{00b7} bbbb \u{00b7} cccc",
            text_w("aaaa \u{00b7} bbbb", 12.0) + 1.0,
            12.0,
        );
        assert_eq!(lines, vec!["aaaa \u{00b7} bbbb", "cccc"]);
        let long = "x".repeat(500);
        let lines = wrap(&long, 200.0, 12.0);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].ends_with('\u{2026}'));
        assert_eq!(truncate("m5.large", 36), "m5.large");
    }

    #[test]
    fn exact_chart_has_a_stacked_bar_per_group_and_a_fill_bar() {
        let r = exact_of(CLUSTER);
        let svg = exact_chart(&r);
        let doc = check(&svg);
        assert_eq!(with_class(&doc, "bar-row").len(), 2);
        // Every node uses assigned, warm and primary addresses; no pod goes without.
        assert_eq!(with_class(&doc, "assigned").len(), 2);
        assert_eq!(with_class(&doc, "warm").len(), 2);
        assert_eq!(with_class(&doc, "primary").len(), 2);
        assert!(with_class(&doc, "without-ip").is_empty());
        assert_eq!(with_class(&doc, "fill").len(), 1);
        assert_eq!(with_class(&doc, "used").len(), 1);
        assert!(with_class(&doc, "over").is_empty() && with_class(&doc, "short").is_empty());
        let t = texts(&doc);
        assert!(t[0].contains("reference policy"), "{}", t[0]);
        assert!(t
            .iter()
            .any(|x| x.contains("360 used") && x.contains("147 remaining")));
        assert!(t.iter().any(|x| x == "m5.12xlarge \u{00d7} 2"));
        assert!(t.iter().any(|x| x.starts_with("360 of 507 used (71%)")));
        // The bar of the bigger group is longer: 150 vs 60 addresses per node.
        let width = |row: usize| -> f64 {
            with_class(&doc, "bar-row")[row]
                .descendants()
                .filter(|n| n.has_tag_name("rect"))
                .map(|n| {
                    n.attribute("width")
                        .and_then(|w| w.parse::<f64>().ok())
                        .unwrap_or(0.0)
                })
                .sum()
        };
        assert!(
            (width(0) / width(1) - 150.0 / 60.0).abs() < 0.05,
            "{} {}",
            width(0),
            width(1)
        );
    }

    #[test]
    fn exact_chart_flags_pods_without_an_ip() {
        let r = exact_of(
            "subnet: {prefix_length: 20}
config: {minimum_ip_target: 10, policy: reference}
node_groups: [{instance_type: m5.xlarge, count: 1, pods_per_node: 20}]",
        );
        assert_eq!(r.node_groups[0].pods_without_ip_per_node, 10);
        let doc_text = exact_chart(&r);
        let doc = check(&doc_text);
        assert_eq!(with_class(&doc, "without-ip").len(), 1);
        let alerts = with_class(&doc, "alert");
        assert_eq!(alerts.len(), 1);
        assert!(alerts[0]
            .text()
            .unwrap_or_default()
            .contains("10 pods without an IP"));
    }

    #[test]
    fn an_oversubscribed_subnet_shows_its_shortfall_in_red() {
        let r = exact_of(
            "subnet: {cidr: 10.0.0.0/26}
node_groups: [{instance_type: m5.large, count: 4, pods_per_node: 10}]",
        );
        assert!(r.node_groups[0].pods_without_ip_total > 0);
        let svg = exact_chart(&r);
        let doc = check(&svg);
        assert_eq!(with_class(&doc, "short").len(), 1);
        assert_eq!(with_class(&doc, "capacity").len(), 1);
        assert!(texts(&doc).iter().any(|t| t.contains("short by")));
        assert!(with_class(&doc, "alert")[0]
            .text()
            .unwrap_or_default()
            .contains("subnet full"));
        assert_eq!(with_class(&doc, "notes").len(), 1, "the warning is listed");
    }

    #[test]
    fn hostile_instance_names_are_escaped_everywhere() {
        let yaml = format!(
            "subnet: {{cidr: 10.0.0.0/23}}
node_groups: [{{instance_type: {:?}, count: 1, pods_per_node: 5, max_enis: 3, ipv4_per_eni: 10, vcpus: 2}}]",
            HOSTILE
        );
        let r = exact_of(&yaml);
        assert_eq!(r.node_groups[0].instance_type, HOSTILE);
        let mut wb = workbook_of(CLUSTER, Sheet::WarmEni);
        if let Rows::WarmEni(rows) = &mut wb.rows {
            rows[0].basis.instance_type = HOSTILE.to_owned();
        }
        for svg in [exact_chart(&r), workbook_chart(&wb), compare_chart(&wb, &r)] {
            assert!(
                !svg.contains("<script") && !svg.contains("</text><"),
                "raw markup leaked"
            );
            let doc = check(&svg);
            assert!(
                texts(&doc).iter().any(|t| t.contains(HOSTILE)),
                "the name reads back unchanged"
            );
        }
    }

    #[test]
    fn exact_chart_handles_no_groups_and_all_zero_values() {
        let mut r = exact_of(CLUSTER);
        r.node_groups.clear();
        r.subnet.ips_used = 0;
        let doc_text = exact_chart(&r);
        let doc = check(&doc_text);
        assert!(with_class(&doc, "bar-row").is_empty());
        assert_eq!(with_class(&doc, "empty").len(), 1);
        assert_eq!(with_class(&doc, "fill").len(), 1);

        let mut r = exact_of(CLUSTER);
        for g in &mut r.node_groups {
            g.pod_ips_per_node = 0;
            g.unused_pod_ips_per_node = 0;
            g.subnet_ips_per_node = 0;
            g.subnet_ips_total = 0;
        }
        r.subnet.ips_used = 0;
        r.subnet.usable_ips = 0;
        r.subnet.ips_remaining = 0;
        let doc_text = exact_chart(&r);
        let doc = check(&doc_text);
        assert_eq!(with_class(&doc, "bar-row").len(), 2);
        assert!(
            with_class(&doc, "seg").is_empty(),
            "zero-width segments are left out"
        );
        assert!(texts(&doc)
            .iter()
            .any(|t| t.starts_with("0 of 0 used (\u{2014})")));
    }

    #[test]
    fn workbook_chart_compares_used_ips_with_pods_per_row() {
        for sheet in [Sheet::WarmEni, Sheet::WarmIp] {
            let r = workbook_of(CLUSTER, sheet);
            let svg = workbook_chart(&r);
            let doc = check(&svg);
            assert_eq!(with_class(&doc, "bar-row").len(), 2);
            assert_eq!(with_class(&doc, "pods").len(), 2);
            assert_eq!(
                with_class(&doc, "used").len(),
                2 + 1,
                "two rows and the fill bar"
            );
            let t = texts(&doc);
            assert!(t[0].contains(sheet_name(sheet).0));
            assert!(t
                .iter()
                .any(|x| x.contains(&format!("{} used", int(r.ips_used)))));
        }
        let r = workbook_of(CLUSTER, Sheet::WarmEni);
        let doc_text = workbook_chart(&r);
        let doc = check(&doc_text);
        assert!(
            texts(&doc).iter().any(|t| t == "152 IPs (+52 vs pods)"),
            "{:?}",
            texts(&doc)
        );
    }

    #[test]
    fn workbook_chart_shows_negative_remaining_as_over() {
        let r = workbook_of(
            "subnet: {prefix_length: 28}
node_groups: [{instance_type: m5.large, count: 3, pods_per_node: 0}]",
            Sheet::WarmEni,
        );
        assert_eq!(r.ips_remaining, -22);
        let svg = workbook_chart(&r);
        let doc = check(&svg);
        assert_eq!(with_class(&doc, "over").len(), 1);
        assert_eq!(with_class(&doc, "capacity").len(), 1);
        let t = texts(&doc);
        assert!(t.iter().any(|x| x.contains("over by 22")));
        assert!(t.iter().any(|x| x.contains("\u{2212}22 remaining")));
        assert!(
            t.iter().any(|x| x == "0 pods"),
            "a zero-height bar still says so"
        );
    }

    #[test]
    fn workbook_chart_without_rows_says_so() {
        let mut r = workbook_of(CLUSTER, Sheet::WarmIp);
        r.rows = Rows::WarmIp(Vec::new());
        let doc_text = workbook_chart(&r);
        let doc = check(&doc_text);
        assert_eq!(with_class(&doc, "empty").len(), 1);
        assert!(with_class(&doc, "bar-row").is_empty());
    }

    #[test]
    fn compare_chart_sets_workbook_and_exact_side_by_side() {
        let wb = workbook_of(CLUSTER, Sheet::WarmEni);
        let ex = exact_of(CLUSTER);
        let svg = compare_chart(&wb, &ex);
        let doc = check(&svg);
        assert_eq!(
            with_class(&doc, "fill").len(),
            2,
            "workbook and exact totals"
        );
        assert_eq!(with_class(&doc, "bar-row").len(), 2);
        assert_eq!(with_class(&doc, "workbook").len(), 2);
        assert_eq!(with_class(&doc, "exact").len(), 2);
        let t = texts(&doc);
        // 351 (workbook) vs 360 (exact): the daemon needs 9 more.
        assert!(
            t.iter()
                .any(|x| x.contains("9 addresses more than the workbook")),
            "{t:?}"
        );
        assert!(
            t.iter().any(|x| x.contains("exact \u{2212}4 (\u{2212}1%)")),
            "{t:?}"
        );

        // Groups the other side lacks still get their row.
        let mut short = wb.clone();
        if let Rows::WarmEni(rows) = &mut short.rows {
            rows.truncate(1);
        }
        let doc_text = compare_chart(&short, &ex);
        let doc = check(&doc_text);
        assert_eq!(with_class(&doc, "bar-row").len(), 2);
        assert_eq!(with_class(&doc, "workbook").len(), 1);
        assert!(texts(&doc).iter().any(|t| t == "n/a"));
    }

    const RAMP: &str = "subnets: [{name: a, cidr: 10.0.0.0/22}, {name: b, cidr: 10.0.8.0/24}]
config: {policy: POLICY}
duration: 2h
node_groups:
  - {instance_type: m5.large, count: 4, subnet: a, pods: {ramp: {from: 0, to: 20, over: 30m}}}
  - {instance_type: m5.large, count: 1, subnet: b, pods: {constant: 5}}
";

    #[test]
    fn timeline_chart_draws_every_series() {
        let r = timeline_of(&RAMP.replace("POLICY", "reference"));
        let svg = timeline_chart(&r);
        let doc = check(&svg);
        assert_eq!(
            series(&doc),
            vec![
                "assigned",
                "warm",
                "cooling",
                "pending",
                "enis",
                "subnet a",
                "subnet b",
                "all calls",
                "mutating calls"
            ]
        );
        assert!(with_class(&doc, "exhaustion").is_empty());
        let t = texts(&doc);
        assert!(
            t[0].contains("reference policy") && t[0].contains("5 nodes"),
            "{}",
            t[0]
        );
        assert!(t.iter().any(|x| x.contains("no subnet ran out")));
        for label in ["0", "30m", "1h", "1h30m", "2h"] {
            assert!(t.iter().any(|x| x == label), "time label {label}");
        }
        // Same report, same bytes.
        assert_eq!(svg, timeline_chart(&r));
    }

    #[test]
    fn timeline_chart_marks_exhaustion_with_hostile_subnet_names_escaped() {
        let name = "tiny<&>\"'";
        let r = timeline_of(&format!(
            "subnets: [{{name: {name:?}, cidr: 10.0.0.0/26}}]
duration: 30m
node_groups: [{{instance_type: m5.large, count: 3, pods: {{ramp: {{from: 0, to: 25, over: 10m}}}}}}]"
        ));
        assert_eq!(r.exhaustion.len(), 1);
        let svg = timeline_chart(&r);
        let doc = check(&svg);
        assert_eq!(with_class(&doc, "exhaustion").len(), 4, "one per panel");
        let labels = with_class(&doc, "exhaustion-label");
        assert_eq!(labels.len(), 1);
        let text = labels[0].text().unwrap_or_default();
        assert!(text.starts_with(&format!("{name} ran out at ")), "{text}");
        assert!(series(&doc).contains(&format!("subnet {name}").as_str()));
    }

    #[test]
    fn long_timelines_are_thinned_to_at_most_600_points_per_series() {
        let r = timeline_of(
            "subnet: {cidr: 10.0.0.0/22}
duration: 3h
tick: 5s
sample_every: 5s
node_groups: [{instance_type: m5.large, count: 2, pods: {daily: {min: 2, max: 25, peak: 1h}}}]",
        );
        assert!(r.samples.len() > 2000, "{}", r.samples.len());
        let svg = timeline_chart(&r);
        let doc = check(&svg);
        let lines: Vec<_> = with_class(&doc, "line");
        assert_eq!(lines.len(), 5);
        for l in lines {
            let n = path_points(l.attribute("d").unwrap_or_default());
            assert!((300..=MAX_POINTS).contains(&n), "{n} points");
        }
        assert!(svg.len() < 200_000, "{} bytes", svg.len());
    }

    #[test]
    fn thinning_keeps_the_ends_and_the_peaks() {
        let samples: Vec<Sample> = (0..10_000u64)
            .map(|i| Sample {
                t: i * 5,
                allocated_ips: if i == 5_001 {
                    999
                } else if i == 7_777 {
                    0
                } else {
                    50
                },
                ..Default::default()
            })
            .collect();
        let picks = downsample(&samples, MAX_POINTS);
        assert!(picks.len() <= MAX_POINTS);
        assert_eq!(picks.first().map(|s| s.t), Some(0));
        assert_eq!(picks.last().map(|s| s.t), Some(9_999 * 5));
        assert!(picks.iter().any(|s| s.allocated_ips == 999));
        assert!(picks.iter().any(|s| s.allocated_ips == 0));
        assert!(picks.windows(2).all(|w| w[0].t < w[1].t), "in time order");
        assert_eq!(downsample(&samples[..10], MAX_POINTS).len(), 10);
    }

    #[test]
    fn a_single_sample_is_held_across_the_axis() {
        let r = timeline_of(
            "subnet: {cidr: 10.0.0.0/22}
duration: 1
node_groups: [{instance_type: m5.large, count: 1, pods: {constant: 3}}]",
        );
        assert_eq!(r.samples.len(), 1);
        for svg in [timeline_chart(&r), timeline_compare_chart(&r, &r)] {
            let doc = check(&svg);
            for l in with_class(&doc, "line") {
                assert_eq!(path_points(l.attribute("d").unwrap_or_default()), 2);
            }
        }
    }

    #[test]
    fn timelines_without_samples_say_so() {
        let mut r = timeline_of(&RAMP.replace("POLICY", "ours"));
        r.samples.clear();
        for svg in [timeline_chart(&r), timeline_compare_chart(&r, &r)] {
            let doc = check(&svg);
            assert_eq!(with_class(&doc, "empty").len(), 1);
            assert!(series(&doc).is_empty());
        }
    }

    #[test]
    fn timeline_compare_overlays_both_policies() {
        let a = timeline_of(&RAMP.replace("POLICY", "reference"));
        let b = timeline_of(&RAMP.replace("POLICY", "ours"));
        let svg = timeline_compare_chart(&a, &b);
        let doc = check(&svg);
        let s = series(&doc);
        assert_eq!(s.len(), 1 + 6 * 2, "{s:?}");
        for metric in [
            "allocated",
            "idle",
            "pending",
            "enis",
            "subnet used",
            "mutating calls",
        ] {
            assert!(
                s.contains(&format!("reference {metric}").as_str()),
                "{metric}"
            );
            assert!(s.contains(&format!("ours {metric}").as_str()), "{metric}");
        }
        let t = texts(&doc);
        assert!(t[0].contains("reference vs ours"));
        assert!(t.iter().any(|x| x.starts_with("ours against reference:")));

        // The same policy twice is told apart by letter.
        let svg = timeline_compare_chart(&a, &a);
        let doc = check(&svg);
        assert!(series(&doc).contains(&"A (reference) allocated"));
        assert!(series(&doc).contains(&"B (reference) allocated"));
    }

    #[test]
    fn timeline_compare_merges_identical_exhaustion_and_keeps_different_ones() {
        let tiny = "subnets: [{name: tiny, cidr: 10.0.0.0/26}]
config: {policy: POLICY}
duration: 30m
node_groups: [{instance_type: m5.large, count: 3, pods: {ramp: {from: 0, to: 25, over: 10m}}}]";
        let a = timeline_of(&tiny.replace("POLICY", "reference"));
        let doc_text = timeline_compare_chart(&a, &a);
        let doc = check(&doc_text);
        let labels = with_class(&doc, "exhaustion-label");
        assert_eq!(labels.len(), 1);
        assert!(labels[0]
            .text()
            .unwrap_or_default()
            .starts_with("both: tiny ran out"));

        let mut b = a.clone();
        b.exhaustion[0].at += 60;
        let doc_text = timeline_compare_chart(&a, &b);
        let doc = check(&doc_text);
        let labels: Vec<String> = with_class(&doc, "exhaustion-label")
            .iter()
            .map(|n| n.text().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(labels.len(), 2, "{labels:?}");
        assert!(labels[0].starts_with("A (reference): tiny"));
        assert!(labels[1].starts_with("B (reference): tiny"));
    }
}
