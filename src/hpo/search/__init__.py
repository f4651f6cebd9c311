"""The shared study: storage, the study, its workers, the reaper, the time budget and the trial objective."""
