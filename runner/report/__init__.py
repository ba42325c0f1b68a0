"""Reports: report.json as one typed model (model.py) and the pages rendered from it, each a list
of neutral blocks (blocks.py) written as Markdown and HTML: a job's (job.py), a comparison's and a
family's (pages.py), with their pictures (figures.py, layout.py) and causal_lm's own parts (lm.py)."""
