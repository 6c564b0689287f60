"""The Ray Data side of x2l's jobs (issue 14): `common` (what both jobs use: start_ray, the checks before a job
starts, paths safe to ship to workers, actor pools with capped restarts, failure isolation), `indexing` (the corpus
indexing pipeline of jobs/index_corpus.py) and `answering` (the in-job answering pool of jobs/answer_questions.py).
Only these modules and the Serve modules (x2l/serve.py, x2l/serve_cli.py) import Ray."""
