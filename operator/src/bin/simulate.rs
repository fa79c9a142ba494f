//! `millrace-simulate`: compares scaling strategies on a compressed day with a spike (see
//! `millrace_operator::simulate`) and prints GPU replica-hours and minutes over budget.

use millrace_operator::simulate::{Scenario, compare};

fn main() {
    let scenario = Scenario::default();
    println!(
        "A {}-hour day: peak {:.0} req/s (trough 20%), a 3x spike for 20 min at 15:00, cache hit ratio {:.0}% ({:.0}% in the spike);",
        scenario.hours,
        scenario.peak_requests,
        scenario.hit_ratio * 100.0,
        scenario.spike_hit_ratio * 100.0
    );
    println!(
        "a GPU replica computes {:.0} misses/s, any replica answers {:.0} hits/s; GPU start-up {} s, CPU {} s; 15 s sync.\n",
        scenario.gpu_misses_per_second,
        scenario.requests_per_replica,
        scenario.gpu_startup.as_secs(),
        scenario.cpu_startup.as_secs()
    );
    let outcomes = compare(&scenario);
    let baseline = outcomes[0].gpu_hours;
    println!(
        "{:<24}{:>12}{:>14}{:>12}{:>16}{:>12}",
        "strategy", "GPU rep-h", "vs static", "CPU rep-h", "min over budget", "degraded"
    );
    for o in &outcomes {
        println!(
            "{:<24}{:>12.1}{:>13.0}%{:>12.1}{:>9} ({:.2}%){:>12}",
            o.name,
            o.gpu_hours,
            100.0 * (o.gpu_hours / baseline - 1.0),
            o.cpu_hours,
            o.minutes_over_budget,
            100.0 * o.over_budget_share(),
            o.minutes_degraded
        );
    }
    println!(
        "\n(degraded: minutes in which the cold compute tier's misses were answered stale or default, marked, within budget)"
    );
}
