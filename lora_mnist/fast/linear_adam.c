/* Training kernels for a ReLU MLP on CPU: each layer's Adam step fused with its weight gradient and the
 * next batch's forward, and the input gradient for the layer below.
 *
 * At small batch a training step is bound by memory traffic, not arithmetic: autograd writes every weight
 * gradient (a sum of batch outer products, as large as the weight), Adam reads it back, and the next forward
 * reads the weights again. Here each weight row's gradient is formed in a per-thread buffer and consumed at
 * once by the Adam update, and the updated row, still in cache, gives the next batch's outputs for that row:
 * the gradient never reaches memory and a layer's weights and moments are read and written once per step,
 * plus one read of the weights for the input gradient (taken before they move).
 *
 * Adam as torch.optim.Adam (no weight decay, no amsgrad):
 *   m = m + (1 - beta1) (g - m);  v = beta2 v + (1 - beta2) g^2
 *   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 *
 * A trained ReLU layer's outputs are mostly zeros, and the kernels skip the products they would only add as
 * zeros: gradient rows of outputs the ReLU cut, weight rows no batch row back-propagates through, and input
 * columns zero in the whole next batch (packed away before the forward).
 *
 * Work is split over OpenMP threads by rows (update) or columns (input gradient), and every output value is
 * computed by one thread in a fixed order, so results do not depend on the thread count.
 *
 * The Adam step runs with subnormal floats flushed to zero. The first moment of a weight whose gradient stays
 * zero decays by beta1 each step into the subnormal range and, rounded there, stops at a few units of 2^-149
 * instead of reaching zero: by the end of an epoch most of the base model's moments are such subnormals, and
 * arithmetic on them is slow (an Adam loop with a third of them ran at half speed here). With eps bounding the
 * denominator, a moment under 2^-126 moves its weight by under 1.2e-29 * lr, less than half a unit in the last
 * place of any weight over 4e-22 * lr, so flushing leaves the weights as they were: the base model of an epoch
 * on MNIST has the same bytes either way.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#define FLUSH_SUBNORMALS 0x8040 /* MXCSR's flush-to-zero and denormals-are-zero bits */
#endif

#define GROUP 8  /* next-batch rows whose dot products share one pass over a weight row */
#define LANES 16 /* floats per vector */
#define GRAD_GROUP 10 /* batch rows of an input-gradient tile: the whole of a batch of 10 reads the weights once */
#define PREFETCH_ROWS 32 /* an input-gradient tile asks for the weight row this many rows ahead: each is a page apart */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

/* Subnormal floats flushed to zero on the calling thread (x86; elsewhere a no-op); returns the previous mode
 * for restore_float_mode. */
static inline unsigned int flush_subnormals(void)
{
#ifdef FLUSH_SUBNORMALS
    const unsigned int mode = _mm_getcsr();
    _mm_setcsr(mode | FLUSH_SUBNORMALS);
    return mode;
#else
    return 0;
#endif
}

static inline void restore_float_mode(unsigned int mode)
{
#ifdef FLUSH_SUBNORMALS
    _mm_setcsr(mode);
#else
    (void)mode;
#endif
}

static inline float adam_update(float p, float *restrict m, float *restrict v, float g, float beta1, float beta2,
                                float eps, float step_size, float bias_correction2_sqrt)
{
    const float m_new = *m + (1 - beta1) * (g - *m);
    const float v_new = beta2 * *v + (1 - beta2) * g * g;
    *m = m_new;
    *v = v_new;
    return p - step_size * m_new / (sqrtf(v_new) / bias_correction2_sqrt + eps);
}

/* the sum of a vector's lanes as a tree of halvings: a fixed order, and short dependency chains */
static inline float horizontal_sum(vec v)
{
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
}

/* out[b * stride] = bias + sum_j row[j] * x[b, j] for nb rows of x, optionally through a ReLU */
static inline __attribute__((always_inline)) void dot_rows(const float *restrict row, float bias, const float *restrict x,
                                                           float *restrict out, const int nb, int64_t in, int64_t stride, int relu)
{
    vec acc[GROUP] = {0};
    int64_t j = 0;
    for (; j + LANES <= in; j += LANES) {
        vec w;
        memcpy(&w, row + j, sizeof(vec));
        for (int b = 0; b < nb; b++) {
            vec xb;
            memcpy(&xb, x + b * in + j, sizeof(vec));
            acc[b] += w * xb;
        }
    }
    for (int b = 0; b < nb; b++) {
        float sum = bias + horizontal_sum(acc[b]);
        for (int64_t jj = j; jj < in; jj++) sum += row[jj] * x[b * in + jj];
        out[b * stride] = relu && sum < 0 ? 0 : sum;
    }
}

/* the next batch's outputs for one updated weight row; nb is made a constant so the sums stay in registers */
static void row_forward(const float *restrict row, float bias, const float *restrict x, float *restrict out,
                        int64_t batch, int64_t in, int64_t stride, int relu)
{
    for (int64_t b0 = 0; b0 < batch; b0 += GROUP) {
        const float *xb = x + b0 * in;
        float *ob = out + b0 * stride;
        switch (batch - b0 < GROUP ? batch - b0 : GROUP) {
        case 1: dot_rows(row, bias, xb, ob, 1, in, stride, relu); break;
        case 2: dot_rows(row, bias, xb, ob, 2, in, stride, relu); break;
        case 3: dot_rows(row, bias, xb, ob, 3, in, stride, relu); break;
        case 4: dot_rows(row, bias, xb, ob, 4, in, stride, relu); break;
        case 5: dot_rows(row, bias, xb, ob, 5, in, stride, relu); break;
        case 6: dot_rows(row, bias, xb, ob, 6, in, stride, relu); break;
        case 7: dot_rows(row, bias, xb, ob, 7, in, stride, relu); break;
        default: dot_rows(row, bias, xb, ob, 8, in, stride, relu); break;
        }
    }
}

/* A forward pass's input, packed: the columns non-zero in some row (cols) and the input restricted to them
 * (batch x count). Once trained, a ReLU layer's outputs are mostly zeros (the base model's first hidden layer:
 * 85% of the columns of a batch of 10) and their products need not be formed; a dense input (count > in / 2)
 * is left unpacked. */
struct packed_input {
    const float *x;
    int64_t in, count, *cols;
    float *values;
};

static struct packed_input pack_input(const float *restrict x, int64_t batch, int64_t in)
{
    struct packed_input packed = {x, in, in, NULL, NULL};
    int64_t *cols = malloc(in * sizeof(int64_t)), count = 0;
    if (!cols) return packed;
    for (int64_t j = 0; j < in; j++)
        for (int64_t b = 0; b < batch; b++)
            if (x[b * in + j] != 0) {
                cols[count++] = j;
                break;
            }
    float *values = count <= in / 2 ? malloc((batch * count + 1) * sizeof(float)) : NULL;
    if (!values) {
        free(cols);
        return packed;
    }
    for (int64_t b = 0; b < batch; b++)
        for (int64_t k = 0; k < count; k++) values[b * count + k] = x[b * in + cols[k]];
    return (struct packed_input){values, count, count, cols, values};
}

/* out[b * stride] for every row b of the packed input, from one weight row; gathered: count floats to use */
static inline void packed_row_forward(const float *restrict row, float bias, const struct packed_input *input,
                                      float *restrict gathered, float *restrict out, int64_t batch, int64_t stride, int relu)
{
    if (input->cols) {
        for (int64_t k = 0; k < input->count; k++) gathered[k] = row[input->cols[k]];
        row = gathered;
    }
    row_forward(row, bias, input->x, out, batch, input->in, stride, relu);
}

static void free_packed(struct packed_input packed)
{
    free(packed.cols);
    free(packed.values);
}

/* output = input @ weight^T + bias (batch x out), through a ReLU when relu is non-zero: the first batch's
 * forward, computed as the fused step computes the later ones */
void linear_forward(const float *restrict weight, const float *restrict bias, const float *restrict input,
                    float *restrict output, int64_t batch, int64_t in, int64_t out, int relu, int threads)
{
    const struct packed_input packed = pack_input(input, batch, in);
#pragma omp parallel num_threads(threads)
    {
        float gathered[packed.count + 1];
#pragma omp for schedule(static)
        for (int64_t i = 0; i < out; i++)
            packed_row_forward(weight + i * in, bias[i], &packed, gathered, output + i, batch, out, relu);
    }
    free_packed(packed);
}

/* weight: out x in, bias: out, input: batch x in (this step's), grad_out: batch x out (dLoss/dOutput),
 * scratch: threads x in floats. When next_input (next_batch x in) is given, next_output (next_batch x out)
 * receives the updated layer's outputs for it, through a ReLU when relu is non-zero. */
void linear_adam_step(float *restrict weight, float *restrict bias, float *restrict exp_avg_w,
                      float *restrict exp_avg_sq_w, float *restrict exp_avg_b, float *restrict exp_avg_sq_b,
                      const float *restrict input, const float *restrict grad_out, float *restrict scratch,
                      const float *restrict next_input, float *restrict next_output, int64_t batch,
                      int64_t next_batch, int64_t in, int64_t out, int relu, int threads, double lr,
                      double beta1, double beta2, double eps, int64_t step)
{
    const float step_size = (float)(lr / (1 - pow(beta1, (double)step)));
    const float bc2_sqrt = (float)sqrt(1 - pow(beta2, (double)step));
    const float b1 = (float)beta1, b2 = (float)beta2, e = (float)eps;
    const struct packed_input packed = next_input ? pack_input(next_input, next_batch, in) : (struct packed_input){0};
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        float *restrict grad_row = scratch + t * in;
        const unsigned int float_mode = flush_subnormals(); /* each thread, the caller's included, then restores it */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < out; i++) {
            /* this row of the weight gradient: sum over the batch of grad_out[b, i] * input[b, :]; a zero
             * grad_out (an output the ReLU cut, most of them once trained) adds only zeros, so it is skipped */
            float bias_grad = grad_out[i];
            if (grad_out[i] != 0)
                for (int64_t j = 0; j < in; j++) grad_row[j] = grad_out[i] * input[j];
            else
                memset(grad_row, 0, in * sizeof(float));
            for (int64_t b = 1; b < batch; b++) {
                const float c = grad_out[b * out + i];
                const float *restrict x = input + b * in;
                bias_grad += c;
                if (c != 0)
                    for (int64_t j = 0; j < in; j++) grad_row[j] += c * x[j];
            }
            float *restrict p = weight + i * in, *restrict m = exp_avg_w + i * in, *restrict v = exp_avg_sq_w + i * in;
            for (int64_t j = 0; j < in; j++) p[j] = adam_update(p[j], m + j, v + j, grad_row[j], b1, b2, e, step_size, bc2_sqrt);
            bias[i] = adam_update(bias[i], exp_avg_b + i, exp_avg_sq_b + i, bias_grad, b1, b2, e, step_size, bc2_sqrt);
            if (next_input) /* the gradient row is spent: it holds the gathered weights */
                packed_row_forward(p, bias[i], &packed, grad_row, next_output + i, next_batch, out, relu);
        }
        restore_float_mode(float_mode);
    }
    free_packed(packed);
}

/* grad_in[b, j..j+LANES) = sum_i grad_out[b, i] * weight[i, j..j+LANES) over the listed rows i, zero where the
 * layer's input was not positive (the ReLU below); one column tile for nb batch rows, the sums in registers */
static inline __attribute__((always_inline)) void input_grad_tile(const float *restrict weight, const float *restrict grad_out,
                                                                  const float *restrict relu_output, float *restrict grad_in,
                                                                  const int nb, int64_t j, int64_t in, int64_t out,
                                                                  const int64_t *restrict rows, int64_t count)
{
    vec acc[GRAD_GROUP] = {0};
    for (int64_t k = 0; k < count; k++) {
        const int64_t i = rows[k];
        if (k + PREFETCH_ROWS < count) __builtin_prefetch(weight + rows[k + PREFETCH_ROWS] * in + j);
        vec w;
        memcpy(&w, weight + i * in + j, sizeof(vec));
        for (int b = 0; b < nb; b++) acc[b] += grad_out[b * out + i] * w;
    }
    for (int b = 0; b < nb; b++) {
        vec h, g = acc[b];
        if (relu_output) {
            memcpy(&h, relu_output + b * in + j, sizeof(vec));
            for (int k = 0; k < LANES; k++) g[k] = h[k] > 0 ? g[k] : 0;
        }
        memcpy(grad_in + b * in + j, &g, sizeof(vec));
    }
}

/* grad_in = (grad_out @ weight) * (relu_output > 0), with the weights before this step's update: the gradient
 * for the layer below; without the mask when relu_output is NULL. Columns are split over threads; each sum runs
 * over the rows in order. A weight row whose grad_out is zero for every batch row of a tile (an output the ReLU
 * cut) would add only zeros: it is not read. */
void linear_input_grad(const float *restrict weight, const float *restrict grad_out, const float *restrict relu_output,
                       float *restrict grad_in, int64_t batch, int64_t in, int64_t out, int threads)
{
    const int64_t tiles = in / LANES;
    int64_t active[out]; /* the rows this group of batch rows needs */
    for (int64_t b0 = 0; b0 < batch; b0 += GRAD_GROUP) {
        const int64_t nb = batch - b0 < GRAD_GROUP ? batch - b0 : GRAD_GROUP;
        const float *go = grad_out + b0 * out, *h = relu_output ? relu_output + b0 * in : NULL;
        float *gi = grad_in + b0 * in;
        int64_t count = 0;
        for (int64_t i = 0; i < out; i++)
            for (int64_t b = 0; b < nb; b++)
                if (go[b * out + i] != 0) {
                    active[count++] = i;
                    break;
                }
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t tile = 0; tile <= tiles; tile++) {
            if (tile == tiles) { /* the columns after the last whole tile */
                for (int64_t b = 0; b < nb; b++)
                    for (int64_t j = tiles * LANES; j < in; j++) {
                        float sum = 0;
                        for (int64_t k = 0; k < count; k++) sum += go[b * out + active[k]] * weight[active[k] * in + j];
                        gi[b * in + j] = !h || h[b * in + j] > 0 ? sum : 0;
                    }
                continue;
            }
            const int64_t j = tile * LANES;
            switch (nb) {
            case 1: input_grad_tile(weight, go, h, gi, 1, j, in, out, active, count); break;
            case 2: input_grad_tile(weight, go, h, gi, 2, j, in, out, active, count); break;
            case 3: input_grad_tile(weight, go, h, gi, 3, j, in, out, active, count); break;
            case 4: input_grad_tile(weight, go, h, gi, 4, j, in, out, active, count); break;
            case 5: input_grad_tile(weight, go, h, gi, 5, j, in, out, active, count); break;
            case 6: input_grad_tile(weight, go, h, gi, 6, j, in, out, active, count); break;
            case 7: input_grad_tile(weight, go, h, gi, 7, j, in, out, active, count); break;
            case 8: input_grad_tile(weight, go, h, gi, 8, j, in, out, active, count); break;
            case 9: input_grad_tile(weight, go, h, gi, 9, j, in, out, active, count); break;
            default: input_grad_tile(weight, go, h, gi, 10, j, in, out, active, count); break;
            }
        }
    }
}
