"""The DuckDB engine (embedded, the default): relational parts as DuckDB SQL, LLM calls as
:mod:`llmsql.step` steps whose answers are registered back as Arrow views.
"""
