-- llmsql quickstart: SQL with LLM functions over a 300-row SQuAD sample, on DuckDB and the
-- embedded SmolLM2-135M model (no network, no GPU). Run from the repository root:
--     llmsql run examples/quickstart.sql
-- The cheap predicate (title = ...) runs first and the LIMIT bounds the LLM work: only
-- 8 rows are sent to the model, each call once per distinct input.
SELECT id,
       question,
       LLM('Answer the question using only the context. Answer with a short phrase.',
           context, question, max_tokens => 16) AS answer,
       LLM_CLASSIFY('What kind of answer does the question ask for?',
                    labels => ['person', 'place', 'date', 'number', 'other'],
                    question) AS answer_type,
       LLM_FILTER('Does the question mention a team? Answer Yes or No.', question) AS about_team
FROM 'examples/data/squad_sample.parquet'
WHERE title = 'Super_Bowl_50'
LIMIT 8;
