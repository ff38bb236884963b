"""The MLflow Model Registry side: versions of exported drafts with lineage, and their pyfunc."""
