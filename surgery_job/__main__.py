from surgery_job.main import run

run()
