//! The Azure Functions 2019 sample (`../shared/data/azure2019`, see its README): the loader
//! and the seeded peak draws that the replay and the reference platform share.

use std::{
    collections::HashMap,
    fmt::Display,
    fs,
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::{anyhow, bail, Context, Result};

/// The memory file's percentile columns and the quantiles they stand for.
pub const MEMORY_QUANTILES: [f64; 8] = [0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99, 1.0];
pub const MEMORY_COLUMNS: [&str; 8] = [
    "AverageAllocatedMb_pct1",
    "AverageAllocatedMb_pct5",
    "AverageAllocatedMb_pct25",
    "AverageAllocatedMb_pct50",
    "AverageAllocatedMb_pct75",
    "AverageAllocatedMb_pct95",
    "AverageAllocatedMb_pct99",
    "AverageAllocatedMb_pct100",
];

/// `$EMARS_DATA_DIR`, else `<workspace>/../shared/data/azure2019`.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("EMARS_DATA_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/azure2019"),
    }
}

/// A small comma-separated table (the sample has no quoting), keyed by column name.
struct Csv {
    path: PathBuf,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Csv {
    fn read(path: &Path) -> Result<Csv> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header = lines
            .next()
            .ok_or_else(|| anyhow!("{}: empty file", path.display()))?
            .split(',')
            .map(|s| s.trim().to_string())
            .collect::<Vec<_>>();
        let mut rows = Vec::new();
        for (i, line) in lines.enumerate() {
            let row: Vec<String> = line.split(',').map(|s| s.trim().to_string()).collect();
            if row.len() != header.len() {
                bail!(
                    "{}: data line {} has {} fields, the header {}",
                    path.display(),
                    i + 1,
                    row.len(),
                    header.len()
                );
            }
            rows.push(row);
        }
        Ok(Csv {
            path: path.to_path_buf(),
            header,
            rows,
        })
    }

    fn column(&self, name: &str) -> Result<usize> {
        self.header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| anyhow!("{}: no column {name:?}", self.path.display()))
    }

    fn number<T: FromStr>(&self, row: usize, column: usize) -> Result<T>
    where
        T::Err: Display,
    {
        let v = &self.rows[row][column];
        v.parse().map_err(|e| {
            anyhow!(
                "{}: data line {}, column {:?}: {v:?} is not a number: {e}",
                self.path.display(),
                row + 1,
                self.header[column]
            )
        })
    }

    /// Rows keyed by the `HashFunction` column.
    fn by_function(&self) -> Result<HashMap<String, usize>> {
        let c = self.column("HashFunction")?;
        let mut map = HashMap::new();
        for (i, row) in self.rows.iter().enumerate() {
            if map.insert(row[c].clone(), i).is_some() {
                bail!("{}: function {:?} twice", self.path.display(), row[c]);
            }
        }
        Ok(map)
    }
}
pub struct Function {
    pub id: String,
    /// Invocations in each minute of the trace hour.
    pub per_minute: Vec<u32>,
    /// Allocated-memory percentiles (MiB), at [`MEMORY_QUANTILES`], non-decreasing.
    pub memory_mib: [f64; 8],
    pub duration_ms: f64,
}

pub struct Workload {
    pub functions: Vec<Function>,
    /// Functions of the invocation trace without a memory or duration row (left out).
    pub unmatched: Vec<String>,
}

/// Joins the three files on `HashFunction`.
pub fn load(dir: &Path) -> Result<Workload> {
    let inv = Csv::read(&dir.join("invocation_traces_public.csv"))?;
    let mem = Csv::read(&dir.join("memory_traces_public.csv"))?;
    let dur = Csv::read(&dir.join("duration_traces_public.csv"))?;
    let mem_rows = mem.by_function()?;
    let dur_rows = dur.by_function()?;
    let inv_id = inv.column("HashFunction")?;
    let minute_cols = (1..=60)
        .map(|m| inv.column(&m.to_string()))
        .collect::<Result<Vec<_>>>()?;
    let mem_cols = MEMORY_COLUMNS
        .iter()
        .map(|c| mem.column(c))
        .collect::<Result<Vec<_>>>()?;
    let dur_avg = dur.column("Average")?;

    let mut functions = Vec::new();
    let mut unmatched = Vec::new();
    for row in 0..inv.rows.len() {
        let id = inv.rows[row][inv_id].clone();
        let (Some(&m), Some(&d)) = (mem_rows.get(&id), dur_rows.get(&id)) else {
            unmatched.push(id);
            continue;
        };
        let per_minute = minute_cols
            .iter()
            .map(|&c| inv.number::<u32>(row, c))
            .collect::<Result<Vec<_>>>()?;
        let mut memory_mib = [0.0; 8];
        for (slot, &c) in memory_mib.iter_mut().zip(&mem_cols) {
            let v: f64 = mem.number(m, c)?;
            if !(v.is_finite() && v >= 0.0) {
                bail!(
                    "{}: function {id}: {} = {v} is not a size",
                    mem.path.display(),
                    mem.header[c]
                );
            }
            *slot = v;
        }
        // Guard the inverse CDF against a non-monotone row.
        for i in 1..memory_mib.len() {
            memory_mib[i] = memory_mib[i].max(memory_mib[i - 1]);
        }
        let duration_ms: f64 = dur.number(d, dur_avg)?;
        functions.push(Function {
            id,
            per_minute,
            memory_mib,
            duration_ms: duration_ms.max(1.0),
        });
    }
    if functions.is_empty() {
        bail!(
            "{}: no function has invocation, memory and duration rows",
            dir.display()
        );
    }
    Ok(Workload {
        functions,
        unmatched,
    })
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, seedable, good enough for draws.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
/// Piecewise-linear inverse CDF through `(MEMORY_QUANTILES[i], points[i])`; below the first
/// quantile it is flat at the first point.
pub fn inverse_cdf(points: &[f64; 8], u: f64) -> f64 {
    if u <= MEMORY_QUANTILES[0] {
        return points[0];
    }
    for i in 1..MEMORY_QUANTILES.len() {
        let (q0, q1) = (MEMORY_QUANTILES[i - 1], MEMORY_QUANTILES[i]);
        if u <= q1 {
            return points[i - 1] + (points[i] - points[i - 1]) * (u - q0) / (q1 - q0);
        }
    }
    points[points.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_cdf_goes_through_the_points() {
        let pts = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0];
        assert_eq!(inverse_cdf(&pts, 0.0), 10.0);
        assert_eq!(inverse_cdf(&pts, 0.01), 10.0);
        assert_eq!(inverse_cdf(&pts, 0.03), 15.0);
        assert_eq!(inverse_cdf(&pts, 0.5), 40.0);
        assert_eq!(inverse_cdf(&pts, 0.995), 75.0);
        assert_eq!(inverse_cdf(&pts, 1.0), 80.0);
    }

    #[test]
    fn splitmix_is_deterministic_and_uniform_enough() {
        let mut a = SplitMix64(7);
        let mut b = SplitMix64(7);
        let xs: Vec<f64> = (0..10_000).map(|_| a.next_f64()).collect();
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        assert_eq!(xs[123], {
            for _ in 0..123 {
                b.next_f64();
            }
            b.next_f64()
        });
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
