// Drives a running corrald with Xen Orchestra's own connector (npm `xen-api`).
// Usage: node xen_api_client.mjs <url> <password>
// Exits non-zero (with the failed assertion) when Corral behaves differently
// from what the connector expects of XAPI.
import assert from 'node:assert/strict'
import { createClient } from 'xen-api'

const [url, password] = process.argv.slice(2)
const xapi = createClient({ url, allowUnauthorized: true, auth: { user: 'root', password } })

const withTimeout = (promise, ms, what) =>
  Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), ms)),
  ])

await withTimeout(xapi.connect(), 10e3, 'connect')
assert.equal(xapi.status, 'connected')
await withTimeout(xapi.objectsFetched, 10e3, 'initial fetch')

// Every record of every class the connector discovered through
// system.listMethods is in its cache: compare with get_all_records per class.
const byType = xapi.objects.indexes.type
for (const type of ['pool', 'host', 'SM', 'VM', 'role', 'host_metrics']) {
  const records = await xapi.call(`${type}.get_all_records`)
  const cached = Object.values(byType[type] ?? {})
  assert.equal(cached.length, Object.keys(records).length, `cached ${type} records`)
  for (const obj of cached) {
    assert.ok(records[obj.$ref], `${type} ${obj.$ref} in get_all_records`)
  }
}
assert.equal(xapi.pool.$master.$type, 'host', 'pool.$master resolves to the host')
const templates = Object.values(byType.VM).filter(vm => vm.is_a_template)
assert.ok(templates.some(t => t.name_label === 'Other install media'))

// callAsync: Async.VM.clone returns a task; the connector follows it through
// events to its result, which is the new VM's ref parsed from task.result.
const template = templates.find(t => t.name_label === 'Other install media')
const vmRef = await withTimeout(xapi.callAsync('VM.clone', template.$ref, 'xo-vm'), 10e3, 'callAsync')
assert.match(vmRef, /^OpaqueRef:[0-9a-f-]{36}$/)

// barrier(): after a write, the event loop has delivered it to the cache.
await xapi.call('VM.set_name_description', vmRef, 'made by xen-api')
const vm = await withTimeout(xapi.barrier(vmRef), 10e3, 'barrier')
assert.equal(vm.name_label, 'xo-vm')
assert.equal(vm.name_description, 'made by xen-api')
// As in XAPI, a clone of a template is a template until it is unmarked.
assert.equal(vm.is_a_template, true)
await xapi.call('VM.set_is_a_template', vmRef, false)
assert.equal((await xapi.barrier(vmRef)).is_a_template, false)

// A change made by another client reaches this one through event.from.
const other = createClient({ url, allowUnauthorized: true, auth: { user: 'root', password }, watchEvents: false })
await other.connect()
const seen = new Promise(resolve => {
  const onUpdate = objects => {
    const o = objects[vm.$id]
    if (o !== undefined && o.name_label === 'renamed elsewhere') {
      xapi.objects.removeListener('update', onUpdate)
      resolve(o)
    }
  }
  xapi.objects.on('update', onUpdate)
})
await other.call('VM.set_name_label', vmRef, 'renamed elsewhere')
await withTimeout(seen, 10e3, 'event from another session')
await other.disconnect()

// A failing async call rejects with XAPI's error code and parameters.
await assert.rejects(
  withTimeout(xapi.callAsync('VM.clone', 'OpaqueRef:00000000-0000-0000-0000-000000000000', 'x'), 10e3, 'failing callAsync'),
  err => err.code === 'HANDLE_INVALID' && err.params[0] === 'VM'
)

// Networks and VIFs as XO makes and reads them: a VIF on the first device
// VM.get_allowed_VIF_devices offers, with XO's record, linked in the cache.
const netRef = await xapi.call('network.create', {
  name_label: 'xo-net', name_description: '', MTU: 1500, other_config: {},
})
const [device] = await xapi.call('VM.get_allowed_VIF_devices', vmRef)
assert.equal(device, '0')
const vifRef = await xapi.call('VIF.create', {
  device, network: netRef, VM: vmRef, MAC: '', MTU: 1500, other_config: {},
  qos_algorithm_type: '', qos_algorithm_params: {},
  locking_mode: 'network_default', ipv4_allowed: [], ipv6_allowed: [],
})
const vif = await withTimeout(xapi.barrier(vifRef), 10e3, 'VIF barrier')
assert.equal(vif.$network.$type, 'network')
assert.equal(vif.$network.name_label, 'xo-net')
assert.match(vif.$network.bridge, /^xapi\d+$/)
assert.equal(vif.$network.default_locking_mode, 'unlocked')
assert.equal(vif.$VM.$ref, vmRef)
assert.match(vif.MAC, /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/)
assert.equal(vif.currently_attached, false)
assert.equal(vif.locking_mode, 'network_default')
assert.deepEqual(vif.ipv4_allowed, [])
const net = await withTimeout(xapi.barrier(netRef), 10e3, 'network barrier')
assert.deepEqual(net.VIFs, [vifRef])
assert.deepEqual(net.PIFs, [])
assert.deepEqual((await xapi.barrier(vmRef)).VIFs, [vifRef])
// Two VMs never get the same MAC (XO refuses to start duplicates).
const vm2 = await xapi.callAsync('VM.clone', vmRef, 'xo-vm-2')
const [vif2] = await xapi.call('VM.get_VIFs', vm2)
assert.notEqual(await xapi.call('VIF.get_MAC', vif2), vif.MAC)
await xapi.call('VM.destroy', vm2)
// A network whose VIFs are all detached goes, and takes them (as XAPI's).
await xapi.call('network.destroy', netRef)
assert.equal((await xapi.call('VIF.get_all')).includes(vifRef), false)

// Destroying removes the object from the cache once the event arrives.
await xapi.call('VM.destroy', vmRef)
await withTimeout(xapi.barrier(), 10e3, 'barrier after destroy')
assert.equal(xapi.getObjectByRef(vmRef, undefined), undefined)

// barrier() keys are cleaned from pool.other_config.
await withTimeout(xapi.barrier(), 10e3, 'second barrier')
await new Promise(r => setTimeout(r, 300))
const otherConfig = await xapi.call('pool.get_other_config', xapi.pool.$ref)
assert.deepEqual(Object.keys(otherConfig).filter(k => k.startsWith('xo:barrier:')), [])

await xapi.disconnect()
console.log('xen-api client: ok')
process.exit(0)
