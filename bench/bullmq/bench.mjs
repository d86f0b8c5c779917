// BullMQ's side of bench/bullmq.py: the same workloads as the sidecar rows, on the same
// redis-server, printed as one JSON object on stdout.
// Usage: node bench.mjs <redis socket> <ops> <in_flight> <memory_jobs> <payload json file>
import { readFileSync } from 'node:fs';
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';

const [socketPath, opsArg, inFlightArg, memArg, payloadFile, redisPid] = process.argv.slice(2);
const OPS = Number(opsArg);
const IN_FLIGHT = Number(inFlightArg);
const MEMORY_JOBS = Number(memArg);
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

async function enqueueOne() {
  const q = freshQueue();
  const rate = await timed(OPS, async () => {
    for (let i = 0; i < OPS; i++) await q.add('llm', payload, jobOpts(i));
  });
  await q.close();
  return rate;
}

async function enqueueMany() {
  const q = freshQueue();
  const per = Math.ceil(OPS / IN_FLIGHT);
  const rate = await timed(per * IN_FLIGHT, () => Promise.all(
    Array.from({ length: IN_FLIGHT }, async () => {
      for (let i = 0; i < per; i++) await q.add('llm', payload, jobOpts(i));
    })));
  await q.close();
  return rate;
}

async function enqueueBatches() {
  const q = freshQueue();
  const batches = Math.ceil(OPS / BATCH);
  const rate = await timed(batches * BATCH, async () => {
    for (let b = 0; b < batches; b++) {
      await q.addBulk(Array.from({ length: BATCH }, (_, k) => (
        { name: 'llm', data: payload, opts: jobOpts(k) })));
    }
  });
  await q.close();
  return rate;
}

async function dequeueCompleteOne() {
  const q = freshQueue();
  await prefill(q, OPS);
  const worker = new Worker(q.name, null, { connection, autorun: false });
  const token = 'bench-token';
  const rate = await timed(OPS, async () => {
    for (let i = 0; i < OPS; i++) {
      const job = await worker.getNextJob(token);
      if (!job) throw new Error('getNextJob found no job');
      await job.moveToCompleted('ok', token, false);
    }
  });
  await worker.close();
  await q.close();
  return rate;
}

async function workerConcurrent() {
  const q = freshQueue();
  await prefill(q, OPS);
  let done = 0;
  let finish;
  let worker;
  const finished = new Promise((resolve) => { finish = resolve; });
  const rate = await timed(OPS, async () => {
    worker = new Worker(q.name, async () => {}, { connection, concurrency: IN_FLIGHT });
    worker.on('completed', () => {
      done += 1;
      if (done === OPS) finish();
    });
    await finished;
  });
  await worker.close();
  await q.close();
  return rate;
}

async function memoryPerJob() {
  const q = freshQueue();
  const used = async () => Number(/used_memory:(\d+)/.exec(await connection.info('memory'))[1]);
  const before = await used();
  await prefill(q, MEMORY_JOBS);
  const after = await used();
  await q.obliterate({ force: true });
  await q.close();
  return { bytes_per_job: (after - before) / MEMORY_JOBS };
}

const out = {
  enqueue_1: await enqueueOne(),
  enqueue_many: await enqueueMany(),
  enqueue_batches: await enqueueBatches(),
  dequeue_complete_1: await dequeueCompleteOne(),
  worker: await workerConcurrent(),
  memory: await memoryPerJob(),
};
await connection.quit();
process.stdout.write(JSON.stringify(out) + '\n');
