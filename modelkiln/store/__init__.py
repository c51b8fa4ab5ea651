"""The catalogue: SQLAlchemy models, the engine, and the queries. The only place that speaks SQL."""
