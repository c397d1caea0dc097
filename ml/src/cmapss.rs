//! NASA C-MAPSS turbofan data: parsing and run-to-failure labels.
//!
//! File layout: whitespace-separated rows of 26 columns: unit, cycle, 3 operational settings,
//! sensors s1..s21. Rows of one unit are consecutive with cycles 1, 2, ...; in the training
//! files every unit runs until failure, so the RUL at cycle `c` of a unit with `n` cycles is
//! `n - c`.

use std::path::Path;

/// Why a data file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line}: expected 26 columns, got {got}")]
    Columns { line: usize, got: usize },
    #[error("line {line}, column {column}: {value:?} is not a number")]
    Number {
        line: usize,
        column: usize,
        value: String,
    },
    #[error("line {line}: unit {unit} cycle {cycle} does not follow the previous row")]
    Order { line: usize, unit: u32, cycle: u32 },
    #[error("unknown channel {0:?}: expected setting1..3 or s1..s21")]
    Channel(String),
    #[error("no data rows")]
    Empty,
}

/// One engine's run, in cycle order.
#[derive(Debug, Clone)]
pub struct Engine {
    pub unit: u32,
    /// `rows[i]` is cycle `i + 1`; 24 values: 3 settings then s1..s21.
    pub rows: Vec<[f32; 24]>,
}

impl Engine {
    /// Values of `channels` for every cycle, oldest first.
    pub fn select<S: AsRef<str>>(&self, channels: &[S]) -> Result<Vec<Vec<f32>>, DataError> {
        let idx = channels
            .iter()
            .map(|c| column_of(c.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self
            .rows
            .iter()
            .map(|r| idx.iter().map(|&i| r[i]).collect())
            .collect())
    }
}

/// Column (within the 24 values after unit and cycle) of a channel name.
pub fn column_of(channel: &str) -> Result<usize, DataError> {
    let bad = || DataError::Channel(channel.to_owned());
    if let Some(n) = channel.strip_prefix("setting") {
        let n: usize = n.parse().map_err(|_| bad())?;
        return (1..=3).contains(&n).then(|| n - 1).ok_or_else(bad);
    }
    let n: usize = channel
        .strip_prefix('s')
        .ok_or_else(bad)?
        .parse()
        .map_err(|_| bad())?;
    (1..=21).contains(&n).then(|| n + 2).ok_or_else(bad)
}

/// Parses a C-MAPSS text file.
pub fn parse(text: &str) -> Result<Vec<Engine>, DataError> {
    let mut engines: Vec<Engine> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.is_empty() {
            continue;
        }
        if cols.len() != 26 {
            return Err(DataError::Columns {
                line: line_no,
                got: cols.len(),
            });
        }
        let num = |c: usize| -> Result<f32, DataError> {
            let s = cols.get(c).copied().unwrap_or_default();
            s.parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| DataError::Number {
                    line: line_no,
                    column: c + 1,
                    value: s.to_owned(),
                })
        };
        let unit = num(0)? as u32;
        let cycle = num(1)? as u32;
        let mut row = [0f32; 24];
        for (k, v) in row.iter_mut().enumerate() {
            *v = num(k + 2)?;
        }
        match engines.last_mut() {
            Some(e) if e.unit == unit => {
                if cycle as usize != e.rows.len() + 1 {
                    return Err(DataError::Order {
                        line: line_no,
                        unit,
                        cycle,
                    });
                }
                e.rows.push(row);
            }
            _ => {
                if cycle != 1 {
                    return Err(DataError::Order {
                        line: line_no,
                        unit,
                        cycle,
                    });
                }
                engines.push(Engine {
                    unit,
                    rows: vec![row],
                });
            }
        }
    }
    if engines.is_empty() {
        return Err(DataError::Empty);
    }
    Ok(engines)
}

/// Reads and parses a C-MAPSS file.
pub fn load(path: &Path) -> Result<Vec<Engine>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(unit: u32, cycle: u32, s2: f32) -> String {
        let mut v = vec![unit.to_string(), cycle.to_string()];
        for k in 0..24 {
            v.push(if k == 4 {
                s2.to_string()
            } else {
                format!("{k}.5")
            });
        }
        v.join(" ")
    }

    #[test]
    fn parses_units_and_selects_channels() {
        let text = [row(1, 1, 10.0), row(1, 2, 11.0), row(2, 1, 20.0)].join("\n");
        let e = parse(&text).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].rows.len(), 2);
        assert_eq!(e[0].select(&["s2"]).unwrap(), vec![vec![10.0], vec![11.0]]);
        assert_eq!(
            e[1].select(&["setting1", "s2"]).unwrap(),
            vec![vec![0.5, 20.0]]
        );
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let err = parse(&format!("{}\n1 2 3", row(1, 1, 1.0))).unwrap_err();
        assert_eq!(err.to_string(), "line 2: expected 26 columns, got 3");
        let bad = row(1, 1, 1.0).replacen("2.5", "x", 1);
        assert!(parse(&bad).unwrap_err().to_string().contains("column 5"));
        let gap = [row(1, 1, 1.0), row(1, 3, 1.0)].join("\n");
        assert!(matches!(parse(&gap), Err(DataError::Order { line: 2, .. })));
        assert!(column_of("s22").is_err());
        assert!(matches!(parse(""), Err(DataError::Empty)));
    }

    #[test]
    fn the_real_fd001_file_has_100_engines() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/train_FD001.txt");
        let e = load(&path).unwrap();
        assert_eq!(e.len(), 100);
        assert_eq!(e.iter().map(|e| e.rows.len()).sum::<usize>(), 20631);
    }
}
