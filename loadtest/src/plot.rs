//! Charts from JSON result lines: delivered throughput per scenario and broker (median of runs),
//! and latency percentiles of the `latency` scenario per broker.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    v[v.len() / 2]
}

pub fn plot(input: &Path, out_dir: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let rows: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    std::fs::create_dir_all(out_dir).map_err(|e| e.to_string())?;
    let key =
        |r: &serde_json::Value| format!("{} q{}", r["scenario"].as_str().unwrap_or(""), r["qos"].as_u64().unwrap_or(0));
    let mut labels: Vec<String> = rows.iter().filter_map(|r| r["label"].as_str().map(String::from)).collect();
    labels.sort();
    labels.dedup();

    // Throughput bars.
    let mut tput: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r["scenario"] != "latency" && r["scenario"] != "conns") {
        let label = r["label"].as_str().unwrap_or("").to_string();
        tput.entry((key(r), label)).or_default().push(r["throughput"].as_f64().unwrap_or(0.0));
    }
    let mut scenarios: Vec<String> = tput.keys().map(|(s, _)| s.clone()).collect();
    scenarios.dedup();
    let max = tput.values().map(|v| median(v.clone())).fold(1.0, f64::max);
    let path = out_dir.join("throughput.svg");
    {
        let root = SVGBackend::new(&path, (900, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let n = scenarios.len().max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption("Delivered messages per second (median of runs, broker on one core)", ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..n, 0.0..max * 1.15)
            .map_err(|e| e.to_string())?;
        let names = scenarios.clone();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(scenarios.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                    names[i].clone()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
            .draw()
            .map_err(|e| e.to_string())?;
        let colors = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44)];
        let width = 0.8 / labels.len().max(1) as f64;
        for (li, label) in labels.iter().enumerate() {
            let color = colors[li % colors.len()];
            let bars: Vec<Rectangle<(f64, f64)>> = scenarios
                .iter()
                .enumerate()
                .filter_map(|(si, s)| {
                    let v = median(tput.get(&(s.clone(), label.clone()))?.clone());
                    let x0 = si as f64 + 0.1 + li as f64 * width;
                    Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.95, v)], color.filled()))
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(|e| e.to_string())?
                .label(label.clone())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }

    // Latency percentiles.
    let quantiles = [("p50_us", 50.0), ("p90_us", 90.0), ("p99_us", 99.0), ("p999_us", 99.9), ("max_us", 100.0)];
    let lat: Vec<&serde_json::Value> = rows.iter().filter(|r| r["scenario"] == "latency").collect();
    if !lat.is_empty() {
        let path = out_dir.join("latency.svg");
        let root = SVGBackend::new(&path, (900, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let series: Vec<(String, Vec<(f64, f64)>)> = labels
            .iter()
            .map(|label| {
                let mine: Vec<&&serde_json::Value> = lat.iter().filter(|r| r["label"] == label.as_str()).collect();
                let pts = quantiles
                    .iter()
                    .enumerate()
                    .map(|(i, (k, _))| (i as f64, median(mine.iter().filter_map(|r| r[*k].as_f64()).collect())))
                    .collect();
                (label.clone(), pts)
            })
            .collect();
        let ymax = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.1)).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption("End-to-end latency at a fixed offered rate (median of runs)", ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..(quantiles.len() - 1) as f64, (1.0..ymax * 2.0).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_labels(quantiles.len())
            .x_label_formatter(&|x| {
                let i = x.round() as usize;
                ["p50", "p90", "p99", "p99.9", "max"].get(i).map_or(String::new(), |s| s.to_string())
            })
            .y_desc("microseconds")
            .draw()
            .map_err(|e| e.to_string())?;
        let colors = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44)];
        for (i, (label, pts)) in series.into_iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2)));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    println!("charts written to {}", out_dir.display());
    Ok(())
}

/// A markdown table of medians per scenario and broker, with the ratio of the first label to the
/// second (e.g. tern / mosquitto) for every figure.
pub fn summarize(input: &Path, out: &Path, first: &str, second: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let rows: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let mut keys: Vec<String> = Vec::new();
    for r in &rows {
        let k = scenario_key(r);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let med = |k: &str, label: &str, field: &str| -> Option<f64> {
        let v: Vec<f64> = rows
            .iter()
            .filter(|r| scenario_key(r) == k && r["label"] == label)
            .filter_map(|r| match field {
                "broker_rss_mib" => r["broker_rss"].as_f64().map(|b| b / 1048576.0),
                _ => r[field].as_f64(),
            })
            .collect();
        (!v.is_empty()).then(|| median(v))
    };
    let runs = |k: &str, label: &str| rows.iter().filter(|r| scenario_key(r) == k && r["label"] == label).count();
    let fmt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    let mut md = String::new();
    md.push_str(&format!("| scenario | figure | {first} | {second} | {first}/{second} |\n|---|---|---:|---:|---:|\n"));
    for k in &keys {
        let suite_case = rows.iter().any(|r| r["case"].as_str() == Some(k.as_str()));
        let figures: &[(&str, &str, usize)] = if suite_case && k.starts_with("conn-") {
            &[
                ("connections", "connections held", 0),
                ("connect_rate", "connects/s", 0),
                ("p50_us", "CONNECT → CONNACK p50 (µs)", 1),
                ("p99_us", "CONNECT → CONNACK p99 (µs)", 1),
                ("broker_cpu_s", "broker CPU-s, connecting and holding", 2),
                ("broker_rss_mib", "broker RSS (MiB)", 1),
                ("rss_per_connection", "broker RSS per connection (bytes)", 0),
            ]
        } else if suite_case {
            &[
                ("throughput", "delivered msg/s", 0),
                ("lost", "QoS 1 messages lost", 0),
                ("duplicates", "duplicates", 0),
                ("p50_us", "p50 latency (µs)", 1),
                ("p90_us", "p90 latency (µs)", 1),
                ("p99_us", "p99 latency (µs)", 1),
                ("p999_us", "p99.9 latency (µs)", 1),
                ("broker_cpu_s", "broker CPU-s over the run", 2),
                ("broker_rss_mib", "broker RSS (MiB)", 1),
            ]
        } else if k.starts_with("conns") {
            &[
                ("connections", "connections held", 0),
                ("connect_rate", "connects/s", 0),
                ("rss_per_connection", "broker RSS per connection (bytes)", 0),
            ]
        } else if k.starts_with("latency") {
            &[
                ("p50_us", "p50 latency (µs)", 1),
                ("p99_us", "p99 latency (µs)", 1),
                ("p999_us", "p99.9 latency (µs)", 1),
                ("cpu_s_per_million", "broker CPU-s per million delivered", 2),
            ]
        } else {
            &[
                ("throughput", "delivered msg/s", 0),
                ("cpu_s_per_million", "broker CPU-s per million delivered", 3),
                ("lost", "messages lost (QoS 0: dropped under overload)", 0),
                ("p99_us", "p99 latency (µs)", 0),
            ]
        };
        for (field, name, digits) in figures {
            let a = med(k, first, field);
            let b = med(k, second, field);
            md.push_str(&format!(
                "| {k} (runs: {}/{}) | {name} | {} | {} | {} |\n",
                runs(k, first),
                runs(k, second),
                fmt(a, *digits),
                fmt(b, *digits),
                ratio(a, b)
            ));
        }
    }
    std::fs::write(out, md).map_err(|e| e.to_string())?;
    println!("summary written to {}", out.display());
    Ok(())
}

fn scenario_key(r: &serde_json::Value) -> String {
    if let Some(case) = r["case"].as_str() {
        return case.to_string();
    }
    let s = r["scenario"].as_str().unwrap_or("");
    if s == "conns" {
        return "conns".into();
    }
    // The protocol version is not part of the key: runs that differ only in it are compared
    // with each other when their labels say which is which (perf/v5.sh).
    format!(
        "{s} {}->{} QoS {}",
        r["publishers"].as_u64().unwrap_or(0),
        r["subscribers"].as_u64().unwrap_or(0),
        r["qos"].as_u64().unwrap_or(0)
    )
}
