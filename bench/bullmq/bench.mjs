// BullMQ's side of bench/bullmq.py: the same workloads as the sidecar rows, on the same
// redis-server, one slice at a time so the Python side can alternate slices between the two.
// Usage: node bench.mjs <redis socket> <in_flight> <payload json file> <redis pid>
// Then one JSON command a line on stdin, {"row": <key>, "n": <jobs>}, answered by one JSON line
// on stdout: {rate, node, redis} (jobs/s, CPU µs per job), or {bytes_per_job} for "memory".
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';

const [socketPath, inFlightArg, payloadFile, redisPid] = process.argv.slice(2);
const IN_FLIGHT = Number(inFlightArg);
const BATCH = 64;
const payload = JSON.parse(readFileSync(payloadFile, 'utf8'));
const connection = new IORedis({ path: socketPath, maxRetriesPerRequest: null });
// BullMQ has no TTL for a waiting job; completed jobs are kept an hour, like the sidecar's
// retention of terminal metadata.
const jobOpts = (i) => ({ priority: 1 + (i % 10), removeOnComplete: { age: 3600 } });
let queueNo = 0;

function freshQueue() {
  queueNo += 1;
  return new Queue(`bench${queueNo}`, { connection });
}

// CPU seconds redis-server has used so far (utime + stime; clock ticks of 100 Hz).
function redisCpuS() {
  const stat = readFileSync(`/proc/${redisPid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

// Jobs per second, and CPU µs per job of this process and of redis-server.
async function timed(n, fn) {
  const redis0 = redisCpuS();
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  await fn();
  const rate = (n * 1e9) / Number(process.hrtime.bigint() - t0);
  const cpu = process.cpuUsage(cpu0);
  return { rate, node: (cpu.user + cpu.system) / n, redis: ((redisCpuS() - redis0) * 1e6) / n };
}

async function prefill(queue, n) {
  for (let i = 0; i < n; i += 500) {
    const size = Math.min(500, n - i);
    await queue.addBulk(Array.from({ length: size }, (_, k) => (
      { name: 'llm', data: payload, opts: jobOpts(i + k) })));
  }
}

// Each row runs on a queue of its own, emptied afterwards so Redis does not grow slice by slice.
async function onFreshQueue(fn) {
  const q = freshQueue();
  try {
    return await fn(q);
  } finally {
    await q.obliterate({ force: true });
    await q.close();
  }
}

const rows = {
  enqueue_1: (n) => onFreshQueue((q) => timed(n, async () => {
    for (let i = 0; i < n; i++) await q.add('llm', payload, jobOpts(i));
  })),

  enqueue_many: (n) => onFreshQueue((q) => {
    const per = Math.ceil(n / IN_FLIGHT);
    return timed(per * IN_FLIGHT, () => Promise.all(
      Array.from({ length: IN_FLIGHT }, async () => {
        for (let i = 0; i < per; i++) await q.add('llm', payload, jobOpts(i));
      })));
  }),

  enqueue_batches: (n) => onFreshQueue((q) => {
    const batches = Math.ceil(n / BATCH);
    return timed(batches * BATCH, async () => {
      for (let b = 0; b < batches; b++) {
        await q.addBulk(Array.from({ length: BATCH }, (_, k) => (
          { name: 'llm', data: payload, opts: jobOpts(k) })));
      }
    });
  }),

  dequeue_complete_1: (n) => onFreshQueue(async (q) => {
    await prefill(q, n);
    const worker = new Worker(q.name, null, { connection, autorun: false });
    const token = 'bench-token';
    const rate = await timed(n, async () => {
      for (let i = 0; i < n; i++) {
        const job = await worker.getNextJob(token);
        if (!job) throw new Error('getNextJob found no job');
        await job.moveToCompleted('ok', token, false);
      }
    });
    await worker.close();
    return rate;
  }),

  // Each completion fetches the next job in the same call, as BullMQ's own Worker does; the
  // first job is taken before the clock starts.
  complete_next_1: (n) => onFreshQueue(async (q) => {
    await prefill(q, n + 1);
    const worker = new Worker(q.name, null, { connection, autorun: false });
    const token = 'bench-token';
    let job = await worker.getNextJob(token);
    const rate = await timed(n, async () => {
      for (let i = 0; i < n; i++) {
        const next = await job.moveToCompleted('ok', token, true);
        if (!Array.isArray(next) || !next[0]) throw new Error('moveToCompleted fetched no job');
        job = await worker.nextJobFromJobData(next[0], next[1], token);
      }
    });
    await worker.close();
    return rate;
  }),

  worker: (n) => onFreshQueue(async (q) => {
    await prefill(q, n);
    let done = 0;
    let finish;
    let worker;
    const finished = new Promise((resolve) => { finish = resolve; });
    const rate = await timed(n, async () => {
      worker = new Worker(q.name, async () => {}, { connection, concurrency: IN_FLIGHT });
      worker.on('completed', () => {
        done += 1;
        if (done === n) finish();
      });
      await finished;
    });
    await worker.close();
    return rate;
  }),

  memory: (n) => onFreshQueue(async (q) => {
    const used = async () => Number(/used_memory:(\d+)/.exec(await connection.info('memory'))[1]);
    const before = await used();
    await prefill(q, n);
    const after = await used();
    return { bytes_per_job: (after - before) / n };
  }),
};

for await (const line of createInterface({ input: process.stdin })) {
  const { row, n } = JSON.parse(line);
  const run = rows[row];
  if (!run) throw new Error(`unknown row ${row}`);
  process.stdout.write(JSON.stringify(await run(n)) + '\n');
}
await connection.quit();
