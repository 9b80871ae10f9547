"""The Spark engine: everything that runs a plan on Apache Spark.

- :mod:`~llmsql.executors.spark.executor`: the executor (driver side), one LLM call at a time;
- :mod:`~llmsql.executors.spark.session`: opening or attaching to the SparkSession;
- :mod:`~llmsql.executors.spark.sql`: the plan's relational parts as Spark SQL;
- :mod:`~llmsql.executors.spark.partition` and :mod:`~llmsql.executors.spark.layout`:
  prefix-affinity partitioning (the pure algorithm, and its Spark settings and plans);
- :mod:`~llmsql.executors.spark.orders`: the driver's per-row field orders;
- :mod:`~llmsql.executors.spark.worker`: the code that runs on executors (tasks and the
  executor's long-lived inference worker);
- :mod:`~llmsql.executors.spark.tasks`: the driver's view of the tasks' statistics.

pyspark is imported only inside these modules' functions: importing this package is cheap.
The DataFrame column functions (``llm_filter(...)`` on a pyspark DataFrame) are the public
:mod:`llmsql.spark_columns`.
"""
