//! Measured values and the statistics the report shows.

/// Measured values of one quantity, one per round.
#[derive(Debug, Clone, Default)]
pub(crate) struct Samples(pub(crate) Vec<f64>);

impl Samples {
    pub(crate) fn median(&self) -> f64 {
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        match sorted.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        }
    }

    pub(crate) fn min(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub(crate) fn max(&self) -> f64 {
        self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// One variant's figures.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) name: &'static str,
    pub(crate) what: &'static str,
    pub(crate) samples: Samples,
}

/// Per round, `name`'s sample over `base`'s sample of the same round: drift of the machine
/// between rounds cancels out. Empty if either row is missing.
pub(crate) fn paired_ratio(rows: &[Row], name: &str, base: &str) -> Samples {
    let find = |wanted: &str| rows.iter().find(|row| row.name == wanted);
    let (Some(row), Some(base)) = (find(name), find(base)) else {
        return Samples(Vec::new());
    };
    Samples(
        row.samples
            .0
            .iter()
            .zip(&base.samples.0)
            .map(|(value, base)| value / base)
            .collect(),
    )
}

/// `0..n` starting at `round % n`: each round runs every variant, in a rotated order.
pub(crate) fn rotated(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + round) % n)
}
