//! Figures of the report: repeated samples summarised as median, min and max, a mesh figure
//! beside its no-mesh baseline from the same run.
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Stat {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = match sorted.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => sorted[n / 2],
            n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Stat {
            median,
            min: *sorted.first().unwrap_or(&f64::NAN),
            max: *sorted.last().unwrap_or(&f64::NAN),
            samples: samples.to_vec(),
        }
    }

    fn show(&self, digits: usize) -> String {
        if self.samples.len() > 1 {
            format!("{:.d$} [{:.d$}–{:.d$}]", self.median, self.min, self.max, d = digits)
        } else {
            format!("{:.d$}", self.median, d = digits)
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub group: String,
    pub name: String,
    pub unit: String,
    pub baseline: Option<Stat>,
    pub mesh: Stat,
    /// mesh / baseline (medians).
    pub ratio: Option<f64>,
    /// mesh − baseline (medians), for latencies.
    pub added: Option<f64>,
    pub target: Option<String>,
}

impl Figure {
    pub fn mesh_only(group: &str, name: &str, unit: &str, mesh: &[f64]) -> Figure {
        Figure {
            group: group.into(),
            name: name.into(),
            unit: unit.into(),
            baseline: None,
            mesh: Stat::of(mesh),
            ratio: None,
            added: None,
            target: None,
        }
    }

    pub fn compared(group: &str, name: &str, unit: &str, baseline: &[f64], mesh: &[f64]) -> Figure {
        let (b, m) = (Stat::of(baseline), Stat::of(mesh));
        let ratio = (b.median != 0.0).then(|| m.median / b.median);
        let added = Some(m.median - b.median);
        Figure {
            group: group.into(),
            name: name.into(),
            unit: unit.into(),
            baseline: Some(b),
            mesh: m,
            ratio,
            added,
            target: None,
        }
    }

    pub fn target(mut self, t: &str) -> Figure {
        self.target = Some(t.into());
        self
    }

    pub fn row(&self) -> String {
        let digits = if self.unit == "µs" || self.unit == "conn/s" { 0 } else { 3 };
        let baseline = self.baseline.as_ref().map_or("—".into(), |b| b.show(digits));
        let ratio = self.ratio.map_or("—".into(), |r| format!("{r:.2}×"));
        let added = match (&self.baseline, self.added, self.unit.as_str()) {
            (Some(_), Some(a), "µs") => format!(" (+{a:.0} µs)"),
            _ => String::new(),
        };
        format!(
            "| {} | {} | {} | {} | {}{} | {} |",
            self.name,
            self.unit,
            baseline,
            self.mesh.show(digits),
            ratio,
            added,
            self.target.as_deref().unwrap_or("")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max_and_ratio() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[1.0, 2.0]).median, 1.5);
        let f = Figure::compared("g", "x", "Gbit/s", &[10.0], &[5.0]);
        assert_eq!(f.ratio, Some(0.5));
    }
}
