"""System tests: the `radai` processes as a site runs them (node, Celery workers, dashboard in a
browser) with real brokers, including the slow load, fault and soak tests (marked slow)."""
