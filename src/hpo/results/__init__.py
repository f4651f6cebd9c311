"""What a search leaves: the finalizer, its members, the report and the plots."""
