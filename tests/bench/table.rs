//! Figures and the results table: samples of repeated runs (median with min–max), units, the
//! pass/fail verdict, and the Markdown rendering. Measuring is the scenarios' job.

use std::fmt::Write as _;

/// How a figure is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes per second, shown in GB/s (10^9).
    GBps,
    /// Bytes per second, shown in MB/s (10^6).
    MBps,
    /// A plain ratio, three decimals.
    Ratio,
    /// Events per second, whole.
    PerSec,
    /// CPU-seconds per GB moved.
    CpuPerGb,
    /// Percent of one core.
    Percent,
    /// Milliseconds.
    Ms,
    /// KiB.
    KiB,
    /// A count.
    Count,
}

impl Unit {
    fn num(self, x: f64) -> String {
        match self {
            Unit::GBps => format!("{:.2}", x / 1e9),
            Unit::MBps => format!("{:.1}", x / 1e6),
            Unit::Ratio => format!("{x:.3}"),
            Unit::CpuPerGb => format!("{x:.2}"),
            Unit::Percent => format!("{x:.1}"),
            Unit::Ms | Unit::PerSec | Unit::Count => format!("{x:.0}"),
            Unit::KiB => format!("{x:.1}"),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Unit::GBps => " GB/s",
            Unit::MBps => " MB/s",
            Unit::Ratio | Unit::Count => "",
            Unit::PerSec => "/s",
            Unit::CpuPerGb => " CPU-s/GB",
            Unit::Percent => " %",
            Unit::Ms => " ms",
            Unit::KiB => " KiB",
        }
    }
}

/// The values one figure took over repeated runs.
#[derive(Debug, Clone, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    /// Adds one run's value.
    pub fn push(&mut self, x: f64) {
        self.0.push(x);
    }

    /// The median (mean of the middle two for an even count); NaN when empty.
    pub fn median(&self) -> f64 {
        let mut v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => {
                v.truncate(n / 2 + 1);
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        }
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Smallest value.
    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    /// Largest value.
    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }

    /// "median (min–max) unit", or "value unit" for a single run.
    pub fn show(&self, u: Unit) -> String {
        match self.0.len() {
            0 => "n/a".into(),
            1 => format!("{}{}", u.num(self.0[0]), u.suffix()),
            _ => format!(
                "{} ({}–{}){}",
                u.num(self.median()),
                u.num(self.min()),
                u.num(self.max()),
                u.suffix()
            ),
        }
    }
}

/// Jain's fairness index of the shares `x`: 1 when all are equal, 1/n when one takes everything.
pub fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    if squares == 0.0 {
        return f64::NAN;
    }
    sum * sum / (x.len() as f64 * squares)
}

/// Whether a row met its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Met.
    Pass,
    /// Missed.
    Fail,
    /// A reference figure with no target of its own.
    Info,
    /// Could not be measured.
    NotRun,
}

impl Verdict {
    /// Pass when `ok`, else fail.
    pub fn of(ok: bool) -> Verdict {
        if ok { Verdict::Pass } else { Verdict::Fail }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "**FAIL**",
            Verdict::Info => "—",
            Verdict::NotRun => "n/a",
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Scenario number and name.
    pub scenario: String,
    /// What was measured, and through what.
    pub figure: String,
    /// The figure: median (min–max).
    pub value: String,
    /// Ratios and the target.
    pub target: String,
    /// Met or not.
    pub verdict: Verdict,
}

/// The results, printed row by row as they come and rendered whole at the end.
#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
    /// Definitions and caveats printed under the table.
    pub notes: Vec<String>,
}

impl Table {
    /// Adds a row and echoes it to stderr as progress.
    pub fn push(
        &mut self,
        scenario: &str,
        figure: &str,
        value: String,
        target: String,
        v: Verdict,
    ) {
        let row = Row {
            scenario: scenario.into(),
            figure: figure.into(),
            value,
            target,
            verdict: v,
        };
        eprintln!("  {}", line(&row));
        self.rows.push(row);
    }

    /// A row for a scenario that could not run, saying why.
    pub fn not_run(&mut self, scenario: &str, figure: &str, why: &str) {
        self.push(
            scenario,
            figure,
            format!("n/a ({why})"),
            String::new(),
            Verdict::NotRun,
        );
    }

    /// Adds a note once.
    pub fn note(&mut self, text: String) {
        if !self.notes.contains(&text) {
            self.notes.push(text);
        }
    }

    /// (passed, failed) counts.
    pub fn score(&self) -> (usize, usize) {
        let n = |v| self.rows.iter().filter(|r| r.verdict == v).count();
        (n(Verdict::Pass), n(Verdict::Fail))
    }

    /// The whole table as Markdown under `header`.
    pub fn render(&self, header: &str) -> String {
        let mut out = format!("{header}\n\n");
        out.push_str("| scenario | figure | median (min–max) | ratio / target | result |\n");
        out.push_str("|---|---|---|---|---|\n");
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        let (pass, fail) = self.score();
        let _ = writeln!(out, "\n{pass} targets met, {fail} missed.");
        for n in &self.notes {
            let _ = writeln!(out, "\n- {n}");
        }
        out
    }
}

fn line(r: &Row) -> String {
    format!(
        "| {} | {} | {} | {} | {} |",
        r.scenario,
        r.figure,
        r.value,
        r.target,
        r.verdict.label()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(Samples(vec![3.0, 1.0, 2.0]).median(), 2.0);
        assert_eq!(Samples(vec![4.0, 1.0, 2.0, 3.0]).median(), 2.5);
        assert!(Samples(vec![]).median().is_nan());
    }

    #[test]
    fn show_gives_median_and_spread() {
        let s = Samples(vec![1.5e9, 1.2e9, 1.4e9]);
        assert_eq!(s.show(Unit::GBps), "1.40 (1.20–1.50) GB/s");
        assert_eq!(Samples(vec![0.5]).show(Unit::Ratio), "0.500");
    }

    #[test]
    fn jain_is_one_for_equal_shares_and_one_over_n_for_a_hog() {
        assert!((jain(&[5.0, 5.0, 5.0, 5.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[8.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
    }
}
