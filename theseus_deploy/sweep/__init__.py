"""`theseus-deploy sweep`: accuracy/latency Pareto over depths and backends, chosen by a latency budget.

pareto (the decision, standard library only) <- api (stages) -> latency (bench runners), report.
"""
