-- llmsql quickstart: SQL with LLM functions over a 300-row SQuAD sample, on DuckDB and the
-- embedded SmolLM2 model (no network, no GPU). Run from the repository root:
--     llmsql run examples/quickstart.sql
-- The cheap predicate (title = ...) runs first; the LLM filter sees only its rows; the two
-- SELECT calls run only on rows that passed both.
SELECT id,
       question,
       LLM('Answer the question using only the context. Answer with a short phrase.',
           context, question, max_tokens => 16) AS answer,
       LLM_CLASSIFY('What kind of answer does the question ask for?',
                    labels => ['person', 'place', 'date', 'number', 'other'],
                    question) AS answer_type
FROM 'examples/data/squad_sample.parquet'
WHERE title = 'Super_Bowl_50'
  AND LLM_FILTER('Does the question ask about a team or a player? Answer Yes or No.', question)
ORDER BY id
LIMIT 10;
