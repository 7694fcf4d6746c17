from setuptools import find_packages, setup

setup(
    name='surgery_job',
    version='0.1.0',
    description='Distributed, sharded checkpoint surgery for JAX/Flax/Orbax checkpoints.',
    packages=find_packages(include=['surgery_job', 'surgery_job.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'orbax-checkpoint>=0.12.8',
        'tensorstore>=0.1.86',
        'absl-py>=2.5.1',
        'ml_collections>=1.1.0',
        'optax>=0.2.8',
        'etils[epath-gcs]>=1.15.0',
        'ml_dtypes>=0.5.0',  # float8_e8m0fnu, for safetensors' F8_E8M0.
    ],
    extras_require={'test': [
        'pytest>=8', 'pytest-xdist==3.8.0', 'pyyaml>=6', 'gcp-storage-emulator>=2026.7.19',
        'safetensors>=0.8',  # 0.8: every dtype in formats.safetensors_file.
        # The Llama tests compare with transformers' forward pass. Exactly this torch: its CPU
        # wheel is on the machine image; any other version downloads a CUDA build of several GB.
        'torch==2.13.0', 'transformers==5.24.0',
        'ruff==0.17.5', 'mypy==2.4.1',  # make lint: exactly these, so a new release cannot fail it.
    ]},
    entry_points={'console_scripts': [
        'surgery-job=surgery_job.main:run',
        'surgery-job-inspect=surgery_job.inspect:run',
        'surgery-job-diff=surgery_job.diff:run',
        'surgery-job-report=surgery_job.report:run',
    ]},
)
