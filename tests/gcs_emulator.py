"""A local GCS bucket for the tests: gcp-storage-emulator on 127.0.0.1, in memory, with what
tensorstore's gcs driver (Orbax's arrays) and gcsfs (epath) need from GCS and the emulator lacks:
an `x-goog-generation` header, `ifGenerationMatch`/`ifGenerationNotMatch`, `startOffset`/`endOffset`
on listings, `moveTo`, and one request at a time on its storage.

It also counts the requests it answers with a handler, by method and kind (`GET list`, `GET metadata`,
`GET read`, `POST upload`, `DELETE delete`, `POST copy`, `POST move`, `POST batch`, ...; each
operation inside a batch also under `batched`): `GET /_surgery_job/requests` answers
`{"total": N, "requests": {kind: n}, "batched": {method: n}}`, and `?reset=1` zeros them after
answering (`Emulator.request_counts`). Object stores bill and wait per request; the counts show how
many a job makes.

`python tests/gcs_emulator.py --bucket NAME` binds a free port, prints it and serves until killed (or
until the process that started it is gone); with `--print-env` it prints the variables to export
instead (the README's gs:// on a laptop). `running()` does that in a subprocess: the job and the
tests are separate processes, and a server thread in the test process would compete with it for the
GIL.
"""

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path

HOST = '127.0.0.1'  # Never another address: the emulator has no authentication.
# Where google-auth and tensorstore would look for a GCE metadata server: port 1 on 127.0.0.1, where
# nothing listens (binding it needs root), so any probe is refused at once instead of timing out.
NO_METADATA_SERVER = f'{HOST}:1'
COUNTS_PATH = '/_surgery_job/requests'
# Handler -> kind of request; others are counted under their handler's name.
KINDS = {'ls': 'list', 'get': 'metadata', 'download': 'read', 'insert': 'upload',
         'upload_partial': 'upload', 'xml_upload': 'upload', 'copy': 'copy', 'rewrite': 'copy',
         '_health_check': 'health check'}


def _serve(bucket: str, parent_pid: int, print_env: bool = False) -> None:
  # Imported here: the test process only starts the server and must not need the package loaded.
  from gcp_storage_emulator import server as emulator
  from gcp_storage_emulator.handlers import buckets, objects
  from gcp_storage_emulator.storage import Storage

  lock = threading.Lock()  # The emulator's storage is plain dicts, unsafe under concurrent requests.
  resumable_conditions = {}  # upload_id -> the preconditions of the request that began the upload.

  def generation(storage, bucket_name, name) -> str:
    """The live generation of the object, '0' when there is none (as GCS's preconditions count)."""
    return storage.objects.get(bucket_name, {}).get(name, {}).get('generation', '0')

  def failed(response, status: HTTPStatus) -> None:
    response.status = status
    if status != HTTPStatus.NOT_MODIFIED:  # Which has no body.
      response.json({'error': {'code': status.value, 'message': status.phrase,
                               'errors': [{'reason': 'conditionNotMet',
                                           'message': status.phrase}]}})

  def target(request, storage) -> str | None:
    """The object a request's generation preconditions apply to: the destination of a copy or move,
    the object read, written or deleted, or the object of the resumable upload."""
    params, query = request.params or {}, request.query
    if 'dest_object_id' in params:
      return params['dest_object_id']
    if 'object_id' in params:
      return params['object_id']
    if 'upload_id' in query:
      return storage.resumable.get(query['upload_id'][0], {}).get('name')
    if 'name' in query:
      return query['name'][0]
    data = request.data
    if isinstance(data, dict):
      return (data.get('meta') or data).get('name')
    return None

  def precondition_status(request, storage, name, conditions) -> HTTPStatus | None:
    current = generation(storage, request.params['bucket_name'], name)
    if request.method == 'GET' and current == '0':
      return None  # A read of a missing object is a 404, whatever it asked for.
    match = conditions.get('ifGenerationMatch', [None])[0]
    not_match = conditions.get('ifGenerationNotMatch', [None])[0]
    if match is not None and match != current:
      return HTTPStatus.PRECONDITION_FAILED
    if not_match is not None and not_match == current:
      return HTTPStatus.NOT_MODIFIED if request.method == 'GET' else HTTPStatus.PRECONDITION_FAILED
    source_match = conditions.get('ifSourceGenerationMatch', [None])[0]
    if source_match is not None and source_match != generation(
        storage, request.params['bucket_name'], request.params.get('object_id')):
      return HTTPStatus.PRECONDITION_FAILED
    return None

  def fixed(handler):
    """`handler` run alone on the storage, after GCS's generation preconditions, answering with the
    object's generation in headers as GCS does."""

    @functools.wraps(handler)
    def run(request, response, storage, *args, **kwargs):
      request.data  # pylint: disable=pointless-statement  # Read the body before taking the lock.
      with lock:
        name = target(request, storage)
        conditions = request.query
        if 'upload_id' in request.query:
          conditions = resumable_conditions.get(request.query['upload_id'][0], {})
        if name is not None and 'bucket_name' in (request.params or {}):
          status = precondition_status(request, storage, name, conditions)
          if status is not None:
            return failed(response, status)
        handler(request, response, storage, *args, **kwargs)
        location = response._headers.get('Location', '')  # pylint: disable=protected-access
        if 'upload_id=' in location:
          upload_id = location.rsplit('upload_id=', 1)[1]
          resumable_conditions[upload_id] = {k: v for k, v in request.query.items()
                                             if k.startswith('if')}
        bucket_name = (request.params or {}).get('bucket_name')
        live = storage.objects.get(bucket_name, {}).get(name) if name else None
        if live is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
          response['x-goog-generation'] = live['generation']
          response['x-goog-metageneration'] = live['metageneration']
    return run

  def ranged_ls(request, response, storage):
    """Listing with `startOffset` (inclusive) and `endOffset` (exclusive), as tensorstore lists
    key ranges."""
    objects.ls(request, response, storage)
    start = request.query.get('startOffset', [''])[0]
    end = request.query.get('endOffset', [None])[0]
    if response.status != HTTPStatus.OK or not (start or end):
      return
    listing = json.loads(response._content)  # pylint: disable=protected-access
    inside = lambda name: start <= name and (end is None or name < end)
    listing['items'] = [item for item in listing['items'] if inside(item['name'])]
    listing['prefixes'] = [prefix for prefix in listing['prefixes'] if inside(prefix)]
    response.json(listing)

  def move(request, response, storage):
    """objects.moveTo: a copy and a delete, atomic here since requests run one at a time."""
    params = request.params
    try:
      moved = objects._copy(request.base_url, storage, params['bucket_name'], params['object_id'],  # pylint: disable=protected-access
                            params['bucket_name'], params['dest_object_id'])
    except objects.NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return
    storage.delete_file(params['bucket_name'], params['object_id'])
    response.json(moved)

  counts_lock = threading.Lock()
  served, batched = collections.Counter(), collections.Counter()

  def counted(method: str, kind: str, handler):
    @functools.wraps(handler)
    def run(request, response, storage, *args, **kwargs):
      media = request.query.get('alt') == ['media']  # objects.get serves data with alt=media.
      with counts_lock:
        served[f'{method} {"read" if kind == "metadata" and media else kind}'] += 1
        if kind == 'batch':
          batched.update(item.get('method') for item in request.data)
      return handler(request, response, storage, *args, **kwargs)
    return run

  def counts(request, response, storage):  # pylint: disable=unused-argument
    with counts_lock:
      response.json({'total': sum(served.values()), 'requests': dict(served),
                     'batched': dict(batched)})
      if request.query.get('reset') == ['1']:
        served.clear()
        batched.clear()

  api = emulator.settings.API_ENDPOINT
  move_route = (rf'^{api}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/'
                r'(?P<dest_object_id>.*[^/]+)$', {'POST': move})
  routes = [(rf'^{COUNTS_PATH}$', {'GET': counts})]  # Before the public file route matches it.
  for pattern, methods in (move_route, *emulator.HANDLERS):
    routes.append((pattern, {
        method: counted(method, KINDS.get(handler.__name__, handler.__name__),
                        fixed(ranged_ls if handler is objects.ls else handler))
        for method, handler in methods.items()}))
  emulator.HANDLERS = tuple(routes)  # Looked up by the emulator's Router on every request.

  storage = Storage(use_memory_fs=True)
  buckets.create_bucket(bucket, storage)
  # Deleted objects go at once instead of into a soft-delete copy that the memory would keep.
  storage.buckets[bucket]['softDeletePolicy']['retentionDurationSeconds'] = '0'

  class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # tensorstore opens many connections at once.

    def handle_error(self, request, client_address):
      # gcsfs sends a lookup and a listing together and drops the one it no longer needs.
      if not isinstance(sys.exc_info()[1], ConnectionError):
        super().handle_error(request, client_address)

  httpd = Server((HOST, 0), functools.partial(emulator.RequestHandler, storage))

  def exit_with_parent():
    while os.getppid() == parent_pid:
      time.sleep(0.5)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=exit_with_parent, daemon=True).start()
  if print_env:
    url = f'http://{HOST}:{httpd.server_address[1]}'
    print(''.join(f'export {name}={value}\n' for name, value in environment(url).items())
          + f'# gs://{bucket} is served at {url} until this command ends (Ctrl-C).', flush=True)
  else:
    print(httpd.server_address[1], flush=True)
  httpd.serve_forever()


@dataclasses.dataclass(frozen=True)
class Emulator:
  """A running emulator: `url` of its HTTP endpoint, `bucket` as `gs://NAME`, and `env`, the
  variables with which Orbax, tensorstore and epath (gcsfs) in any process use it."""
  url: str
  bucket: str
  env: dict

  def request_counts(self, reset: bool = False) -> dict:
    """The requests served so far (see the module docstring); `reset` zeros them after."""
    with urllib.request.urlopen(f'{self.url}{COUNTS_PATH}{"?reset=1" if reset else ""}') as answer:
      return json.load(answer)


def environment(url: str) -> dict:
  return {
      'TENSORSTORE_GCS_HTTP_URL': url,  # tensorstore's gcs driver, so Orbax's arrays.
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # tensorstore: no credential lookup.
      'STORAGE_EMULATOR_HOST': url,  # gcsfs (epath) and google-cloud-storage.
      'FSSPEC_GCS_TOKEN': 'anon',  # gcsfs: no credential lookup.
      # gcsfs otherwise probes the bucket's type with a call that the emulator lacks: a 60 s stall.
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      'GCE_METADATA_HOST': NO_METADATA_SERVER,
      'GCE_METADATA_IP': NO_METADATA_SERVER,
      'GCE_METADATA_ROOT': NO_METADATA_SERVER,
      'NO_GCE_CHECK': 'True',  # google-auth: do not look for a metadata server at all.
  }


def use_in_this_process(emulator: Emulator) -> None:
  """Points this process's Orbax, tensorstore and epath at `emulator`, even after they were imported
  and used: gcsfs picks its filesystem class from the environment at import, fsspec reads its
  FSSPEC_* settings at import, and both they and epath cache filesystem objects.

  As in the job (surgery_job/paths.py), this process keeps no gcsfs listings: it checks what other
  processes and tensorstore wrote, which a cached listing of the same folder would not show."""
  os.environ.update(emulator.env)
  import fsspec  # pylint: disable=import-outside-toplevel
  import gcsfs.core  # pylint: disable=import-outside-toplevel
  from etils.epath import backend  # pylint: disable=import-outside-toplevel
  fsspec.config.set_conf_env(fsspec.config.conf)
  fsspec.config.conf.setdefault('gcs', {})['use_listings_cache'] = False
  for protocol in ('gs', 'gcs'):  # The plain class: the HNS one was chosen if imported before.
    fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
  gcsfs.core.GCSFileSystem.clear_instance_cache()
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@contextlib.contextmanager
def running(log_dir: Path, bucket: str = 'bucket', timeout: float = 30.0):
  """Yields an `Emulator` served by a subprocess (its output in `log_dir/gcs_emulator.log`), and
  stops it on exit."""
  log_path = Path(log_dir) / 'gcs_emulator.log'
  with open(log_path, 'w+b') as log:
    process = subprocess.Popen(
        [sys.executable, __file__, '--bucket', bucket, '--parent-pid', str(os.getpid())],
        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    try:
      url = f'http://{HOST}:{_port(process, log_path, timeout)}'
      with urllib.request.urlopen(url, timeout=timeout) as answer:  # The emulator's health check.
        answer.read()
      yield Emulator(url, f'gs://{bucket}', environment(url))
    finally:
      process.terminate()
      try:
        process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
      process.stdout.close()


def _port(process: subprocess.Popen, log_path: Path, timeout: float) -> int:
  """The port the emulator printed once listening; an error with its log if it did not."""
  lines = []
  reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
  reader.start()
  reader.join(timeout)
  if lines and lines[0].strip().isdigit():
    return int(lines[0])
  raise RuntimeError(f'The GCS emulator did not start within {timeout} s (exit code '
                     f'{process.poll()}); its log, {log_path}:\n{log_path.read_text()[-4000:]}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--bucket', default='bucket')
  parser.add_argument('--parent-pid', type=int, default=os.getppid(),
                      help='exit when this process is gone')
  parser.add_argument('--print-env', action='store_true',
                      help='print the `export` lines that point the job and Orbax at it, not the port')
  args = parser.parse_args()
  logging.basicConfig(level=logging.ERROR)  # The emulator logs every request and more otherwise.
  _serve(args.bucket, args.parent_pid, args.print_env)


if __name__ == '__main__':
  main()
